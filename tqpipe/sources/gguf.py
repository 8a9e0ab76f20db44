"""Convert a llama-architecture GGUF file into a Hugging Face model folder.

The GGUF is read with the ``gguf`` package (memory-mapped), every tensor is
dequantized to float32 one at a time and written with ``safetensors`` in shards,
llama.cpp tensor names are mapped back to HF llama names, and llama.cpp's Q/K
row permutation (``convert_hf_to_gguf.LlamaModel.permute``) is undone.
``config.json`` comes from the ``llama.*`` metadata and ``tokenizer.json`` is
rebuilt with ``tokenizers`` from the GGUF byte-level BPE vocabulary.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from tqpipe.shards import ShardWriter

logger = logging.getLogger(__name__)
SHARD_BYTES = 2 << 30  # float32 bytes held before a shard is written

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
# tokenizer.ggml.pre values whose HF pre-tokenizer is StarCoder-style:
# single digits split off, then the GPT-2 byte-level regex.
_STARCODER_PRE = {"smollm", "starcoder", "refact"}
_GPT2_PRE = {"gpt-2", "gpt2"}
_CONTROL, _USER_DEFINED, _UNKNOWN = 3, 4, 2


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict:
    """Convert a llama-architecture GGUF file to a Hugging Face folder in out_dir:
    config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, generation_config.json. Returns a small dict summary
    (architecture, n_tensors, n_params, vocab_size)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open_reader(gguf_path)
    arch = _field(reader, "general.architecture", None)
    if arch != "llama":
        raise ValueError(
            f"{gguf_path}: GGUF architecture {arch!r} is not supported; only 'llama' "
            "(Llama, SmolLM, Mistral-style dense) models can be converted. "
            "Start from the original Hugging Face checkpoint instead."
        )
    tokenizer = _build_tokenizer(reader, gguf_path)  # validate before the slow part
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = list(reader.tensors)
    names = {t.name for t in tensors}
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ValueError(f"{gguf_path}: no token_embd.weight tensor; the GGUF holds no full model")
    vocab_size = _hf_shape(embd)[0]
    config = _build_config(reader, vocab_size, tied="output.weight" not in names)
    n_params = _write_safetensors(out_dir, tensors, config, gguf_path)
    _write_json(out_dir / "config.json", config)
    _write_tokenizer_files(reader, tokenizer, config, out_dir)
    summary = {"architecture": arch, "n_tensors": len(tensors), "n_params": n_params,
               "vocab_size": vocab_size}
    logger.info("converted %s -> %s: %s", gguf_path, out_dir, summary)
    return summary


def _open_reader(path: Path) -> GGUFReader:
    """Open ``path`` with GGUFReader, turning low-level failures into a clear ValueError."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path, "r")
    except Exception as exc:  # gguf raises ValueError/struct errors/etc. on junk input
        raise ValueError(
            f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}). "
            "Pass a .gguf model file produced by llama.cpp (magic bytes 'GGUF')."
        ) from exc


_MISSING = object()


def _field(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """Return the decoded value of metadata ``key`` (or ``default`` when absent)."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"{reader.data.filename}: GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _build_config(reader: GGUFReader, vocab_size: int, tied: bool) -> dict[str, Any]:
    """Build an HF ``LlamaConfig`` dict from the ``llama.*`` GGUF metadata."""
    hidden = int(_field(reader, "llama.embedding_length"))
    n_head = int(_field(reader, "llama.attention.head_count"))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // n_head))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", n_head)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if head_dim * n_head != hidden:
        config["head_dim"] = head_dim
    for key in ("bos", "eos", "padding"):
        value = _field(reader, f"tokenizer.ggml.{key}_token_id", None)
        if value is not None:
            config[f"{key.replace('padding', 'pad')}_token_id"] = int(value)
    if _field(reader, "llama.rope.scaling.type", "none") not in ("none", None):
        logger.warning("rope scaling metadata is present but not converted")
    return config


def _hf_tensor_name(name: str) -> str:
    """Map a llama.cpp tensor name (``blk.3.attn_q.weight``) to its HF llama name."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK_RE.match(name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.weight"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face llama equivalent")


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (HF half-split rotary -> GGML interleaved)."""
    split = w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
    return split.swapaxes(1, 2).reshape(w.shape)


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`_permute_rows` (GGML interleaved rotary -> HF half-split)."""
    pairs = w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
    return pairs.swapaxes(1, 2).reshape(w.shape)


def _hf_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """Numpy/HF shape of a tensor (GGUF lists dims fastest-first, i.e. reversed)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _load_tensor(tensor: ReaderTensor, config: dict[str, Any]) -> np.ndarray:
    """Dequantize one tensor to float32 in HF layout, undoing the Q/K permutation."""
    array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    array = array.reshape(_hf_shape(tensor))
    if tensor.name.endswith(".attn_q.weight"):
        array = _unpermute_rows(array, config["num_attention_heads"])
    elif tensor.name.endswith(".attn_k.weight"):
        array = _unpermute_rows(array, config["num_key_value_heads"])
    return np.ascontiguousarray(array, dtype="<f4")


def _write_safetensors(out_dir: Path, tensors: list[ReaderTensor], config: dict[str, Any],
                       source: Path) -> int:
    """Dequantize tensor by tensor into float32 safetensors shards (at most ``SHARD_BYTES``
    held in memory), with the usual ``model.safetensors.index.json`` when there are several.
    Returns the parameter count."""
    types = sorted({t.tensor_type.name for t in tensors})
    logger.info("dequantizing %d tensors (types %s) into %s", len(tensors), types, out_dir)
    writer = ShardWriter(out_dir, shard_bytes=SHARD_BYTES, metadata={"format": "pt", "source": source.name})
    n_params = 0
    for tensor in tqdm(tensors, desc="dequantize", unit="tensor"):
        array = _load_tensor(tensor, config)
        writer.add(_hf_tensor_name(tensor.name), array)
        n_params += array.size
    writer.finish()
    return n_params


def _build_tokenizer(reader: GGUFReader, source: Path) -> Tokenizer:
    """Rebuild a byte-level BPE ``tokenizers.Tokenizer`` from the GGUF vocabulary."""
    model = _field(reader, "tokenizer.ggml.model", None)
    pre = _field(reader, "tokenizer.ggml.pre", None)
    if model != "gpt2":
        raise ValueError(
            f"{source}: tokenizer model {model!r} is not supported; only byte-level BPE "
            "('gpt2') vocabularies can be rebuilt. Use the original HF tokenizer files.")
    if pre not in _STARCODER_PRE | _GPT2_PRE:
        raise ValueError(
            f"{source}: pre-tokenizer {pre!r} is not supported (known: "
            f"{sorted(_STARCODER_PRE | _GPT2_PRE)}). Use the original HF tokenizer files.")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _STARCODER_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(reader, tokens)
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                          for i, t in enumerate(types) if t == _USER_DEFINED])
    return tokenizer


def _post_processor(reader: GGUFReader, tokens: list[str]) -> processors.PostProcessor:
    """ByteLevel post-processing, prefixed with BOS when the GGUF asks for it."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id", None)
    if not _field(reader, "tokenizer.ggml.add_bos_token", False) or bos_id is None:
        return byte_level
    bos = tokens[int(bos_id)]
    template = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, int(bos_id))])
    return processors.Sequence([byte_level, template])


def _write_tokenizer_files(reader: GGUFReader, tokenizer: Tokenizer, config: dict[str, Any],
                           out_dir: Path) -> None:
    """Write tokenizer.json plus the tokenizer, special-token and generation configs."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    special = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        idx = _field(reader, f"tokenizer.ggml.{key}_token_id", None)
        if idx is not None:
            special[f"{name}_token"] = tokens[int(idx)]
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config["max_position_embeddings"],
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        **special,
    }
    template = _field(reader, "tokenizer.chat_template", None)
    if template is not None:
        tok_config["chat_template"] = template
    _write_json(out_dir / "tokenizer_config.json", tok_config)
    _write_json(out_dir / "special_tokens_map.json", special)
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    generation = {k: config[k] for k in keys if k in config}
    _write_json(out_dir / "generation_config.json", generation)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented UTF-8 JSON."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
