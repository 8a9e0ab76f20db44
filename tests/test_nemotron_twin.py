"""Nemotron-H end to end on a toy twin in real HF naming: the flagship recipe, every stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import pytest
from hydra import compose, initialize_config_dir
from mlx_lm import generate
from omegaconf import OmegaConf
from safetensors import safe_open

from tqpipe import runtime
from tqpipe.cli import CONF_DIR
from tqpipe.engine import build
from tqpipe.quant.packing import packed_words
from tqpipe.recipe import Recipe
from tqpipe.runtime.layers import TQLinear, TQSwitchLinear
from tqpipe.synthetic import hf_tensor_shapes

from conftest import NEMOTRON_TWIN, SUPER_CONFIG

FLAGSHIP = "nemotron_super_tq3a_tq2e_g32"


def flagship_on(folder: Path, *overrides: str) -> Recipe:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[
            f"recipe={FLAGSHIP}", "~recipe.model", f"+recipe.model={{kind:local,path:'{folder}'}}",
            "recipe.validate.tokens=256", "recipe.validate.context=64", *overrides,
        ])
    return Recipe.from_config(OmegaConf.to_container(cfg.recipe, resolve=True))


@pytest.fixture(scope="module")
def twin_build(nemotron_twin, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("twin_out")
    results = build(flagship_on(nemotron_twin), outputs=out, workers=2)
    assert [r.status for r in results] == ["built"] * 6
    return out / FLAGSHIP


def test_twin_is_in_hf_naming_with_mtp(nemotron_twin):
    with safe_open(str(nemotron_twin / "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
    assert "backbone.layers.1.mixer.experts.7.up_proj.weight" in keys
    assert "backbone.layers.1.mixer.shared_experts.down_proj.weight" in keys
    assert any(k.startswith("mtp.") for k in keys)
    assert not any("switch_mlp" in k for k in keys)  # stacking is mlx-lm's sanitize, at load


def test_flagship_twin_bits_are_what_the_recipe_says(twin_build):
    folder = twin_build / "pack"
    spec = json.loads((folder / "config.json").read_text())["tqpipe"]["modules"]
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
        attn = [p for p in spec if p.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")]
        assert len(attn) == 4
        for path in attn:
            w = f.get_tensor(f"{path}.weight")
            assert spec[path]["bits"] == 3 and w.shape[-1] == packed_words(NEMOTRON_TWIN["hidden_size"], 3)
        experts = [p for p in spec if ".switch_mlp." in p]
        assert len(experts) == 2 * 2  # fc1 and fc2 in both MoE layers
        for path in experts:
            w, s = f.get_tensor(f"{path}.weight"), f.get_tensor(f"{path}.scales")
            n = s.shape[-1] * 32
            assert spec[path]["bits"] == 2 and w.shape == (NEMOTRON_TWIN["n_routed_experts"], s.shape[1], packed_words(n, 2))
        for kept in ("backbone.embeddings.weight", "lm_head.weight", "backbone.layers.1.mixer.gate.weight",
                     "backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.conv1d.weight"):
            assert kept in keys
    assert not any(k.startswith("mtp.") for k in keys)
    for path in spec:
        if "mixer.in_proj" in path or "latent_proj" in path or "shared_experts" in path:
            assert spec[path]["bits"] == 2


def test_plan_bytes_equal_packed_bytes(twin_build):
    plan = json.loads((twin_build / "rotate" / "plan.json").read_text())
    with safe_open(str(twin_build / "pack" / "model.safetensors"), framework="numpy") as f:
        for t in plan["tensors"]:
            written = sum(f.get_tensor(f"{t['path']}.{k}").nbytes for k in ("weight", "scales", "signs"))
            assert written == t["bytes"], t["path"]


def test_twin_loads_generates_and_validates(twin_build):
    model, tok = runtime.load(twin_build / "pack")
    kinds = {type(m) for _, m in model.named_modules()}
    assert TQSwitchLinear in kinds and TQLinear in kinds
    assert isinstance(generate(model, tok, "hello", max_tokens=4), str)
    val = json.loads((twin_build / "validate" / "validate.json").read_text())
    assert val["runtime_check"]["max_abs_logit_diff"] <= 1e-3 * val["runtime_check"]["logit_scale"]
    assert (twin_build / "publish" / "README.md").exists()


def test_super_config_tensor_list():
    """The real 120B config yields the real tensor inventory: ~123.6 B parameters with MTP."""
    shapes = hf_tensor_shapes(json.loads(SUPER_CONFIG.read_text()))
    assert shapes["backbone.layers.1.mixer.experts.511.up_proj.weight"] == (2688, 1024)
    assert shapes["backbone.layers.0.mixer.in_proj.weight"] == (18560, 4096)
    total = sum(math.prod(s) for s in shapes.values())
    assert 120e9 < total < 125e9
    mx.clear_cache()
