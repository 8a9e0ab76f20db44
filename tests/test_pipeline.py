"""End to end on the real SmolLM2-135M: the `tqpipe` command, all six stages, offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tqpipe.recipe import Recipe
from tqpipe.sources.files import SourceError

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "smollm2_135m_tq3a_tq2e_g32"
STAGE_NAMES = ["fetch", "rotate", "codebook", "pack", "validate", "publish"]


def tqpipe_cli(*args: str, outputs: Path, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("tqpipe")
    env = os.environ | {"TQPIPE_OUTPUTS": str(outputs), "TQPIPE_CACHE": str(ROOT / "outputs" / "_cache")}
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def default_build(tmp_path_factory, smollm_gguf) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("e2e")  # any working directory will do
    outputs = work / "outputs"
    return outputs, tqpipe_cli(outputs=outputs, cwd=work)


@pytest.mark.slow
def test_default_command_builds_all_six_stages(default_build):
    outputs, proc = default_build
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = outputs / RECIPE
    for stage in STAGE_NAMES:
        manifest = json.loads((root / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["outputs"]
    for line in ("size", "bits/weight", "PPL", "KLD"):
        assert line in proc.stdout
    val = json.loads((root / "validate" / "validate.json").read_text())
    q, size = val["quality"], val["size"]
    assert q["tokens_scored"] == 8 * 255 and 0 <= q["top1_agreement"] <= 1 and q["kld_mean"] > 0
    # attention 3-bit and MLP 2-bit at g32 cost 3.5 and 2.5 bits plus one int8 sign per input column
    assert 2.5 < size["bits_per_weight_quantized"] < 3.5
    assert size["quantized_modules"] == 30 * 7
    assert val["runtime_check"]["max_abs_logit_diff"] <= 1e-3 * val["runtime_check"]["logit_scale"]
    assert "paris" in val["generation"]["base"]["text"].lower()  # the GGUF conversion is right
    assert f"KLD {q['kld_mean']:.4f}" in proc.stdout
    assert val["calibration"] == "gptq"
    layers = json.loads((root / "validate" / "layer_errors.json").read_text())
    assert len(layers) == 210 and all(r["output_error"] > 0 for r in layers)


@pytest.mark.slow
def test_card_shows_only_measured_values(default_build):
    outputs, _ = default_build
    pub = outputs / RECIPE / "publish"
    card = (pub / "README.md").read_text()
    val = json.loads((pub / "validate.json").read_text())
    front = card.split("---")[1]
    assert "library_name: mlx" in front and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in front
    assert "license: apache-2.0" in front
    q = val["quality"]
    for value in (q["ppl_quant"], q["ppl_base"], q["kld_mean"], q["ppl_ratio"]):
        assert f"{value:.4f}" in card
    assert f"{100 * q['top1_agreement']:.2f} %" in card
    assert RECIPE in card and "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" in card
    for f in ("model.safetensors", "config.json", "tokenizer.json", "recipe.yaml", "validate.json", "layer_errors.png"):
        assert (pub / f).is_file()
    assert "![per-layer output error](layer_errors.png)" in card
    assert "no text was used" in card  # the default calibration is data-free, and the card says so
    assert f"{val['layer_output_error']['mean']:.4f}" in card
    for section in ("### Speed and memory", "Generation checks", "KLD median / p90 / p99 / p99.9 / max"):
        assert section in card
    assert len(val["checks"]["checks"]) == 5
    for c in val["checks"]["checks"]:
        assert f"| {c['name']} | {'pass' if c['passed'] else 'fail'} |" in card


NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")


def measured_numbers(obj) -> set[str]:
    """Every number in a JSON tree (strings included), written the ways the card writes numbers."""
    out: set[str] = set()
    if isinstance(obj, dict):
        for v in obj.values():
            out |= measured_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= measured_numbers(v)
    elif isinstance(obj, str):
        out |= set(NUMBER.findall(obj))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out |= {str(obj), f"{obj:,}"} | {f"{obj:.{d}f}" for d in range(5)} | {f"{100 * obj:.2f}"}
    return out


@pytest.mark.slow
def test_every_number_in_the_cards_results_comes_from_validate_json(default_build):
    """The card's model details and results hold only numbers that validate.json holds (or, for the
    rules table and the calibration line, the recipe printed on the same card)."""
    outputs, _ = default_build
    pub = outputs / RECIPE / "publish"
    card = (pub / "README.md").read_text()
    val = json.loads((pub / "validate.json").read_text())
    recipe = OmegaConf.to_container(OmegaConf.load(pub / "recipe.yaml"))
    body = card[card.index("## Model details"):card.index("## How it works")]
    body = body.replace(card[card.index("## Quick start"):card.index("## Results")], "")  # code, not figures
    body = re.sub(r"`[^`]*`", "", body)  # code spans: regexes, file names
    numbers = NUMBER.findall(body)
    assert len(numbers) > 40, "the card shows fewer figures than expected"
    known = measured_numbers(val) | measured_numbers([recipe[k] for k in ("rules", "params", "calibration")])
    unknown = sorted({n for n in numbers if n not in known})
    assert not unknown, f"numbers on the card that validate.json does not hold: {unknown}"


@pytest.mark.slow
def test_publish_alone_rerenders_the_card_byte_for_byte(default_build, tmp_path):
    outputs, _ = default_build
    card = outputs / RECIPE / "publish" / "README.md"
    before = card.read_bytes()
    again = tqpipe_cli("stages=[publish]", "force=[publish]", outputs=outputs, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "publish built" in again.stdout
    assert card.read_bytes() == before


@pytest.mark.slow
def test_published_model_loads_and_generates(default_build):
    from mlx_lm import generate

    from tqpipe import runtime

    outputs, _ = default_build
    model, tokenizer = runtime.load(outputs / RECIPE / "publish")
    text = generate(model, tokenizer, "Once upon a time", max_tokens=6)
    assert len(tokenizer.encode(text)) >= 1 and text.strip()


@pytest.mark.slow
def test_second_run_skips_and_subset_runs(default_build, tmp_path):
    outputs, _ = default_build
    again = tqpipe_cli(outputs=outputs, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(f"{s} skipped" in again.stdout for s in STAGE_NAMES)
    subset = tqpipe_cli("stages=[publish]", "force=[publish]", outputs=outputs, cwd=tmp_path)
    assert subset.returncode == 0 and "publish built" in subset.stdout and "fetch" not in subset.stdout.split("stages:")[1]


@pytest.mark.slow
def test_checksum_mismatch_stops_before_conversion(smollm_gguf, tmp_path):
    proc = tqpipe_cli(f"recipe.model.sha256={'0' * 64}", "stages=[fetch]", outputs=tmp_path / "o", cwd=tmp_path)
    assert proc.returncode == 2
    assert "checksum mismatch" in proc.stderr + proc.stdout
    assert not (tmp_path / "o" / RECIPE / "fetch").exists()


def test_unknown_recipe_fails_listing_recipes(tmp_path):
    proc = tqpipe_cli("recipe=nope", outputs=tmp_path, cwd=tmp_path)
    assert proc.returncode != 0
    assert RECIPE in proc.stderr and "recipe/nope" in proc.stderr


def test_bad_regex_is_named_before_any_work(tmp_path):
    proc = tqpipe_cli("recipe.rules.0.pattern='(q'", outputs=tmp_path / "o", cwd=tmp_path)
    assert proc.returncode == 2
    assert re.search(r"recipe\.rules\.0\.pattern.*does not compile", proc.stdout + proc.stderr)
    assert not any((tmp_path / "o" / RECIPE / s).exists() for s in STAGE_NAMES)  # only Hydra's log


def test_hub_source_offline_says_so(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from tqpipe.engine import build

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    r = Recipe.from_config({"name": "hub", "model": {"kind": "hub", "repo": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                            "rules": [{"pattern": "proj", "bits": 3}]})
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE is set"):
        build(r, outputs=tmp_path, stages=["fetch"])
    assert not (tmp_path / "hub" / "fetch").exists()
