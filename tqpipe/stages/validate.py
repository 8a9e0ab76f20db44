"""validate: measure the packed model against the unquantized one.

Perplexity, KL divergence and top-1 agreement on a fixed text (windows of
``context`` tokens, the second half of each scored, as llama.cpp does), size
on disk and bits per weight, and a greedy generation through the packed
runtime. For speed the statistics run on a float32 twin of the packed model
(weights dequantized once); a check on the first tokens proves that the twin
and the packed runtime give the same logits.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import load as load_unquantized
from tqdm import tqdm

from tqpipe import runtime
from tqpipe.eval.generation import greedy
from tqpipe.eval.stats import summarize, token_stats
from tqpipe.calibration import InputMoments
from tqpipe.eval.layer_error import layer_errors, plot_layer_errors
from tqpipe.eval.texts import token_windows
from tqpipe.plan import signs_key
from tqpipe.recipe import Recipe
from tqpipe.runtime.layers import RotatedLinear, TQLinear, TQSwitchLinear
from tqpipe.stages.context import StageContext

log = logging.getLogger(__name__)

NEEDS = ("fetch", "pack")
RUNTIME_TOLERANCE = 1e-3  # max |Δlogit| between packed runtime and its dense twin, relative to max |logit|


def settings(recipe: Recipe) -> dict[str, Any]:
    return recipe.validate_.model_dump()


def to_dense_twin(model: nn.Module) -> int:
    """Replace every quantized layer by its dequantized float32 twin, in place; returns how many."""
    swaps = [(p, m.to_dense()) for p, m in model.named_modules() if isinstance(m, (TQLinear, TQSwitchLinear))]
    model.update_modules(tree_unflatten(swaps))
    mx.eval(model.parameters())
    return len(swaps)


def size_figures(packed: Path, params_total: int) -> dict[str, Any]:
    cfg = json.loads((packed / "config.json").read_text())["tqpipe"]
    report = json.loads((packed / "pack_report.json").read_text())
    plan = report["plan"]
    weights_bytes = sum(p.stat().st_size for p in packed.glob("*.safetensors"))
    files_bytes = sum(p.stat().st_size for p in packed.iterdir() if p.is_file() and p.name != "manifest.json")
    return {
        "disk_bytes": files_bytes,
        "disk_gb": files_bytes / 1e9,
        "weights_bytes": weights_bytes,
        "params_total": params_total,
        "bits_per_weight_model": 8 * weights_bytes / params_total,
        "bits_per_weight_quantized": plan["bits_per_weight"],
        "quantized_params": plan["params"],
        "quantized_modules": len(cfg["modules"]),
        "mean_rel_mse": float(np.mean([r["rel_mse"] for r in report["tensors"]])),
    }


def run(ctx: StageContext) -> dict[str, Any]:
    v = ctx.recipe.validate_
    fetched, packed = ctx.inputs["fetch"], ctx.inputs["pack"]
    base, tokenizer = load_unquantized(str(fetched))
    base.set_dtype(mx.float32)
    t0 = time.time()
    quant, _ = runtime.load(packed, dtype=mx.float32)  # float16 math is emulated on CPUs
    load_seconds = time.time() - t0
    params_total = sum(a.size for _, a in tree_flatten(base.parameters()))

    tokens = token_windows(tokenizer, v.text, tokens=v.tokens, context=v.context, split="validate")

    generation = {"quantized": greedy(quant, tokenizer, v.prompt, v.max_new_tokens),
                  "base": greedy(base, tokenizer, v.prompt, v.max_new_tokens)}
    sample = tokens[:1, : v.check_tokens]
    runtime_logits = quant(sample)
    n_swapped = to_dense_twin(quant)
    twin_logits = quant(sample)
    diff = float(mx.max(mx.abs(runtime_logits - twin_logits)))
    scale = float(mx.max(mx.abs(runtime_logits)))
    if diff > RUNTIME_TOLERANCE * scale:
        raise RuntimeError(f"packed runtime and dequantized twin disagree: max |Δlogit| {diff:.3g} (scale {scale:.3g})")

    per_token: dict[str, list[np.ndarray]] = {}
    half = v.context // 2
    keys = {p: signs_key(p) for p, m in quant.named_modules() if type(m) is RotatedLinear}  # expert stacks: no input moments yet
    with InputMoments(base, keys) as moments:  # the base model's layer inputs, for the per-layer errors
        for window in tqdm(tokens, desc="validate", unit="window"):
            w = window[None]
            stats = token_stats(base(w)[0, half:-1], quant(w)[0, half:-1], window[half + 1:])
            mx.eval(list(moments.store.values()))
            for k, a in stats.items():
                per_token.setdefault(k, []).append(a)
    quality = summarize({k: np.concatenate(a) for k, a in per_token.items()})
    layers = layer_errors(base, quant, moments.store, keys)
    (ctx.out / "layer_errors.json").write_text(json.dumps(layers, indent=1))
    plot_layer_errors(layers, ctx.out / "layer_errors.png", f"{ctx.recipe.name}: per-layer output error on {v.text}")

    result = {
        "recipe": ctx.recipe.name,
        "text": v.text, "context": v.context, "scored": f"second half of each {v.context}-token window",
        "quality": quality,
        "layer_output_error": {"mean": float(np.mean([r["output_error"] for r in layers])),
                               "max": float(np.max([r["output_error"] for r in layers])),
                               "by_kind": _by_kind(layers)},
        "calibration": ctx.recipe.calibration.mode,
        "size": size_figures(packed, params_total),
        "runtime_check": {"tokens": v.check_tokens, "max_abs_logit_diff": diff, "logit_scale": scale,
                          "modules": n_swapped},
        "generation": generation,
        "load_seconds": load_seconds,
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "device": str(mx.default_device())},
    }
    (ctx.out / "validate.json").write_text(json.dumps(result, indent=2))
    return {"kld_mean": quality["kld_mean"], "ppl_quant": quality["ppl_quant"],
            "ppl_base": quality["ppl_base"], "top1": quality["top1_agreement"]}


def _by_kind(rows: list[dict[str, Any]]) -> dict[str, float]:
    kinds = sorted({r["kind"] for r in rows})
    return {k: float(np.mean([r["output_error"] for r in rows if r["kind"] == k])) for k in kinds}
