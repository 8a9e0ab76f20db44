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
from tqpipe.model_io import hf_tensor_shapes

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


def test_predicted_size_equals_every_byte_pack_writes(twin_build):
    """Quantized and kept tensors alike: the plan's total is the tensor data pack writes."""
    plan = json.loads((twin_build / "rotate" / "plan.json").read_text())
    from tqpipe.sources.shapes import DTYPE_BYTES

    written = 0
    for f in (twin_build / "pack").glob("*.safetensors"):
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                written += math.prod(sl.get_shape()) * DTYPE_BYTES[sl.get_dtype()]
    assert written == plan["summary"]["total_bytes"]
    assert plan["dropped"]["roots"] == ["mtp"] and plan["dropped"]["params"] > 0


def test_flagship_plan_offline_from_the_real_config(tmp_path):
    """`tqpipe recipe=nemotron_super_tq3a_tq2e_g32 plan_only=true` with no network: the 120B plan."""
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("tqpipe")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TQPIPE_OUTPUTS": str(tmp_path)}
    proc = subprocess.run([str(exe), f"recipe={FLAGSHIP}", "plan_only=true"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "backbone.layers.*.mixer.switch_mlp.fc1" in out and "backbone.layers.*.mixer.q_proj" in out
    assert "dropped: 2.94B params (mtp.*)" in out
    # 3-bit attention and 2-bit everything else at g32 over 119.5 B params: about 40 GB, not the seed's 36
    assert "predicted size: 39.70 GB = 36.98 GiB" in out
    assert not any(tmp_path.glob(f"{FLAGSHIP}/*/manifest.json"))  # nothing was built


def test_flagship_expert_bytes_follow_from_the_format_alone():
    """The largest class, checked by hand from the config: 40 MoE layers × 512 experts × 2688 rows,
    each row of 1024 inputs at 2 bits (64 uint32 words) plus 32 fp16 scales, and one int8 sign per input."""
    from tqpipe.plan import plan_report
    from tqpipe.sources.shapes import from_config

    cfg = json.loads(SUPER_CONFIG.read_text())
    moe_layers = cfg["hybrid_override_pattern"].count("E")
    e, inter, latent = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["moe_latent_size"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        recipe = Recipe.from_config(OmegaConf.to_container(compose("config", overrides=[f"recipe={FLAGSHIP}"]).recipe,
                                                           resolve=True))
    classes = {r["class"]: r for r in plan_report(recipe, from_config(cfg, "config"))["classes"]}
    fc1 = classes["backbone.layers.*.mixer.switch_mlp.fc1"]
    assert fc1["tensors"] == moe_layers == 40
    assert fc1["bytes"] == moe_layers * (e * inter * (latent * 2 // 8 + latent // 32 * 2) + latent)
