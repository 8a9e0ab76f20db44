"""validate: measure the packed model against the unquantized one.

- Quality: perplexity of both, KL divergence (mean ± stderr, quantiles), Δp and
  top-1 agreement on a fixed text (windows of ``context`` tokens, the second
  half of each scored, as llama.cpp does). The unquantized model's logits are
  computed once per (model, text, tokens, context) and cached in compact form
  under ``<cache>/reference`` (``tqpipe.eval.reference``), so every variant of
  a sweep reuses them; one computed elsewhere can be imported
  (``validate.reference``).
- Per layer: each quantized layer's output error on the activations it sees.
- Speed and memory of the packed runtime (load time, prompt and decode
  tokens/s, peak memory), a greedy continuation, and the generation checks
  (needle, list, code, arithmetic, essay), each pass/fail.
- Size on disk and bits per weight, and the pack's per-tensor errors.

For speed the statistics run on a float32 twin of the packed model (weights
dequantized once); a check on the first tokens proves that the twin and the
packed runtime give the same logits.
"""

from __future__ import annotations

import json
import logging
import os
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
from tqpipe.calibration import InputMoments
from tqpipe.eval.checks import run_checks
from tqpipe.eval.generation import greedy
from tqpipe.eval.reference import (Reference, cached_reference, compute_reference, import_reference,
                                   reference_key, token_stats_compact, tokenizer_fingerprint)
from tqpipe.eval.stats import summarize
from tqpipe.eval.layer_error import layer_errors, plot_layer_errors
from tqpipe.eval.texts import token_windows
from tqpipe.plan import signs_key
from tqpipe.recipe import Recipe
from tqpipe.runtime.layers import RotatedLinear, TQLinear, TQSwitchLinear
from tqpipe.manifest import folder_digest
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


def machine() -> dict[str, Any]:
    from tqpipe.native import native_kernels

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "device": str(mx.default_device()), "mlx": mx.__version__,
            "native_kernels": native_kernels() is not None}


def reference_logits(ctx: StageContext, base: nn.Module, tokenizer: Any, windows: mx.array) -> tuple[Reference, bool]:
    """The unquantized model's compact logits on ``windows``: from the cache, an imported file, or computed
    now (the only time the unquantized model runs), with its greedy continuation of the prompt."""
    v, fetched = ctx.recipe.validate_, ctx.inputs["fetch"]
    meta = {"model": folder_digest(fetched), "text": v.text, "tokens": v.tokens,
            "context": v.context, "k": v.reference_topk, "tokenizer": tokenizer_fingerprint(tokenizer)}
    cache = ctx.cache / "reference"
    if v.reference is not None:
        import_reference(v.reference, cache, meta)
    key = reference_key(meta["model"], v.text, v.tokens, v.context, v.reference_topk, meta["tokenizer"])

    def compute() -> Reference:
        base.set_dtype(mx.float32)
        continuation = greedy(base, tokenizer, v.prompt, v.max_new_tokens)["text"]
        return compute_reference(base, windows, context=v.context, k=v.reference_topk,
                                 meta={**meta, "prompt": v.prompt, "base_continuation": continuation})

    return cached_reference(cache, key, compute)


def tensor_errors(packed: Path) -> dict[str, Any]:
    """Pack's reconstruction error per tensor: relative MSE and the projection ⟨ŵ,w⟩/‖w‖²."""
    rows = json.loads((packed / "pack_report.json").read_text())["tensors"]
    mse = np.array([r["rel_mse"] for r in rows])
    proj = np.array([r["projection"] for r in rows])
    return {"tensors": len(rows), "rel_mse_mean": float(mse.mean()), "rel_mse_max": float(mse.max()),
            "projection_mean": float(proj.mean()), "projection_min": float(proj.min()),
            "worst": max(rows, key=lambda r: r["rel_mse"])["path"]}


def run(ctx: StageContext) -> dict[str, Any]:
    v = ctx.recipe.validate_
    fetched, packed = ctx.inputs["fetch"], ctx.inputs["pack"]
    mx.reset_peak_memory()
    t0 = time.time()
    quant, tokenizer = runtime.load(packed, dtype=mx.float32)  # float16 math is emulated on CPUs
    mx.eval(quant.parameters())
    memory = {"load_seconds": time.time() - t0, "loaded_gb": mx.get_active_memory() / 1e9}
    tokens = token_windows(tokenizer, v.text, tokens=v.tokens, context=v.context, split="validate")

    # the packed runtime itself: speed, memory, a continuation and the generation checks
    speed = greedy(quant, tokenizer, tokens[0, : v.speed_prompt_tokens].tolist(), v.speed_decode_tokens)
    memory["peak_gb"] = speed["peak_memory_gb"]
    generation = {"quantized": greedy(quant, tokenizer, v.prompt, v.max_new_tokens)}
    checks = run_checks(quant, tokenizer, needle_tokens=v.needle_tokens,
                        essay_max_tokens=v.essay_max_tokens) if v.checks else None

    base, _ = load_unquantized(str(fetched), lazy=True)  # read only if the reference must be computed
    ref, reused = reference_logits(ctx, base, tokenizer, tokens)
    generation["base"] = {"prompt": ref.meta.get("prompt", v.prompt), "text": ref.meta.get("base_continuation", "")}

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
    with InputMoments(quant, keys) as moments:  # each layer's inputs in the quantized model, for its output error
        for i, window in enumerate(tqdm(tokens, desc="validate", unit="window")):
            stats = token_stats_compact(ref, i, quant(window[None])[0, half:-1], window[half + 1:])
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
        "reference": {"reused": reused, "top_k": int(ref.meta["k"]), "windows": int(ref.meta["windows"])},
        "layer_output_error": {"mean": float(np.mean([r["output_error"] for r in layers])),
                               "max": float(np.max([r["output_error"] for r in layers])),
                               "by_kind": _by_kind(layers)},
        "tensor_error": tensor_errors(packed),
        "calibration": ctx.recipe.calibration.mode,
        "size": size_figures(packed, sum(a.size for _, a in tree_flatten(base.parameters()))),
        "runtime_check": {"tokens": v.check_tokens, "max_abs_logit_diff": diff, "logit_scale": scale,
                          "modules": n_swapped},
        "speed": {"prompt_tokens": speed["prompt_tokens"], "prompt_tokens_per_s": speed["prompt_tokens_per_s"],
                  "decode_tokens": speed["tokens"], "decode_tokens_per_s": speed["decode_tokens_per_s"]},
        "memory": memory,
        "generation": generation,
        "checks": checks,
        "machine": machine(),
    }
    (ctx.out / "validate.json").write_text(json.dumps(result, indent=2))
    summary = {"kld_mean": quality["kld_mean"], "ppl_quant": quality["ppl_quant"],
               "ppl_base": quality["ppl_base"], "top1": quality["top1_agreement"], "reference_reused": reused}
    if checks is not None:
        summary["checks_passed"] = f"{checks['passed']}/{checks['total']}"
    return summary


def _by_kind(rows: list[dict[str, Any]]) -> dict[str, float]:
    kinds = sorted({r["kind"] for r in rows})
    return {k: float(np.mean([r["output_error"] for r in rows if r["kind"] == k])) for k in kinds}
