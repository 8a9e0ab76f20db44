"""validate and publish on the tiny llama: the reference logits are computed once per model and text,
the statistics are complete, and a card re-renders to the same bytes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqpipe.engine import build
from tqpipe.recipe import Recipe

FAST_VALIDATE = {"tokens": 256, "context": 64, "checks": False, "max_new_tokens": 4,
                 "speed_prompt_tokens": 32, "speed_decode_tokens": 4}


def variant(path: Path, name: str, bits: int, **validate) -> Recipe:
    return Recipe.from_config({
        "name": name, "model": {"kind": "local", "path": str(path)},
        "rules": [{"pattern": r"(self_attn|mlp)\.", "bits": bits}],
        "calibration": {"mode": "none"}, "validate": FAST_VALIDATE | validate,
    })


def test_reference_logits_are_computed_once_across_variants(tiny_llama, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tqpipe.eval.reference")
    cache = tmp_path / "cache"
    stages = ["fetch", "rotate", "codebook", "pack", "validate"]
    first = build(variant(tiny_llama, "v3", 3), outputs=tmp_path, stages=stages, cache=cache)[-1].manifest
    second = build(variant(tiny_llama, "v2", 2), outputs=tmp_path, stages=stages, cache=cache)[-1].manifest
    assert first["summary"]["reference_reused"] is False
    assert second["summary"]["reference_reused"] is True
    computed = [r for r in caplog.records if "reference logits: computed" in r.getMessage()]
    reused = [r for r in caplog.records if "reference logits: reused" in r.getMessage()]
    assert len(computed) == 1 and len(reused) == 1
    assert len(list((cache / "reference").glob("*.safetensors"))) == 1
    # same base model, same text: the unquantized perplexity is the same number in both
    v3 = json.loads((tmp_path / "v3" / "validate" / "validate.json").read_text())
    v2 = json.loads((tmp_path / "v2" / "validate" / "validate.json").read_text())
    assert v3["quality"]["ppl_base"] == v2["quality"]["ppl_base"]
    assert v2["quality"]["kld_mean"] > v3["quality"]["kld_mean"] > 0  # fewer bits, more divergence
    # another context is another reference
    third = build(variant(tiny_llama, "v3c", 3, context=32), outputs=tmp_path, stages=stages, cache=cache)
    assert third[-1].manifest["summary"]["reference_reused"] is False


def test_validate_reports_every_statistic(tiny_llama, tmp_path):
    build(variant(tiny_llama, "v", 3), outputs=tmp_path, stages=["fetch", "rotate", "codebook", "pack", "validate"],
          cache=tmp_path / "cache")
    val = json.loads((tmp_path / "v" / "validate" / "validate.json").read_text())
    q = val["quality"]
    for key in ("ppl_quant", "ppl_base", "ppl_ratio", "kld_mean", "kld_stderr", "kld_median", "kld_p90", "kld_p99",
                "kld_p999", "kld_max", "delta_p_mean", "delta_p_rms", "top1_agreement"):
        assert isinstance(q[key], float), key
    assert q["kld_median"] <= q["kld_p90"] <= q["kld_p99"] <= q["kld_p999"] <= q["kld_max"]
    assert q["tokens_scored"] == (256 // 64) * (64 - 1 - 32)  # the second half of each window
    assert val["context"] == 64 and "second half" in val["scored"]
    assert val["speed"]["prompt_tokens"] == 32 and val["speed"]["decode_tokens_per_s"] > 0
    assert 0 < val["memory"]["loaded_gb"] <= val["memory"]["peak_gb"]
    assert val["memory"]["load_seconds"] > 0
    assert 0 < val["tensor_error"]["rel_mse_mean"] < 1 and 0 < val["tensor_error"]["projection_mean"] <= 1.5
    assert val["checks"] is None  # switched off for this test
    assert {"platform", "processor", "cores", "mlx", "native_kernels"} <= set(val["machine"])
