"""pack: scales, codebook indices and dense bit packing -> a loadable MLX model folder.

Writes ``model.safetensors`` (packed quantized layers plus the kept tensors),
``config.json`` with a ``tqpipe`` section that tells the loader everything
(format version, codebooks, and per module: bits, group size, codebook and
rotation block), the tokenizer files, and ``pack_report.json`` with each
tensor's reconstruction error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from tqpipe import FORMAT_VERSION, __version__
from tqpipe.model_io import TOKENIZER_FILES, build_model, load_weights, read_config
from tqpipe.quant.gptq import output_error
from tqpipe.quant.packing import pack_indices
from tqpipe.quant.quantize import quantize_weight
from tqpipe.quant.scales import dequantize_groups
from tqpipe.recipe import Recipe
from tqpipe.sources.files import link_or_copy
from tqpipe.stages.codebook import codebook_name
from tqpipe.stages.context import StageContext

log = logging.getLogger(__name__)

NEEDS = ("fetch", "rotate", "codebook")


def settings(recipe: Recipe) -> dict[str, Any]:
    return {"scale_method": recipe.codebook.scale_method, "kept_dtype": recipe.kept_dtype,
            "damp": recipe.calibration.damp}


def _rotated_tensors(folder: Path) -> dict[str, Path]:
    where = {}
    for shard in sorted(folder.glob("rotated-*.safetensors")):
        with safe_open(str(shard), framework="numpy") as f:
            where.update({k: shard for k in f.keys()})
    return where


def _kept(arr: mx.array, dtype: str) -> mx.array:
    return arr.astype(getattr(mx, dtype)) if mx.issubdtype(arr.dtype, mx.floating) else arr


def error_stats(w: np.ndarray, w_hat: np.ndarray) -> dict[str, float]:
    """Relative MSE ‖ŵ-w‖²/‖w‖² and projection ⟨ŵ,w⟩/‖w‖² (1.0 = unbiased along w)."""
    norm = float(np.sum(w.astype(np.float64) ** 2)) or 1.0
    return {
        "rel_mse": float(np.sum((w_hat - w).astype(np.float64) ** 2)) / norm,
        "projection": float(np.sum(w_hat.astype(np.float64) * w)) / norm,
    }


def run(ctx: StageContext) -> dict[str, Any]:
    recipe = ctx.recipe
    fetched, rotated = ctx.inputs["fetch"], ctx.inputs["rotate"]
    plan_file = json.loads((rotated / "plan.json").read_text())
    plan = plan_file["tensors"]
    books = json.loads((ctx.inputs["codebook"] / "codebooks.json").read_text())
    config = read_config(fetched)
    model = build_model(config)
    weights = load_weights(fetched, model)
    where = _rotated_tensors(rotated)
    with safe_open(str(rotated / "signs.safetensors"), framework="numpy") as f:
        signs = {k: f.get_tensor(k) for k in f.keys()}
    hessians = {}
    if (rotated / "hessians.safetensors").exists():
        with safe_open(str(rotated / "hessians.safetensors"), framework="numpy") as f:
            hessians = {k: f.get_tensor(k) for k in f.keys()}

    out: dict[str, mx.array] = {}
    modules, report = {}, []
    for t in tqdm(plan, desc="pack", unit="tensor"):
        path, bits, g = t["path"], t["bits"], t["group_size"]
        book = codebook_name(recipe.codebook.kind, bits)
        levels = np.asarray(books[book]["levels"], dtype=np.float32)
        with safe_open(str(where[path]), framework="numpy") as f:
            w = f.get_tensor(path)
        h = hessians.get(t["signs_key"])
        idx, scales = quantize_weight(w, levels, group_size=g, scale_method=recipe.codebook.scale_method,
                                      hessian=h, damp=recipe.calibration.damp)
        out[f"{path}.weight"] = mx.array(pack_indices(idx, bits))
        out[f"{path}.scales"] = mx.array(scales)
        out[f"{path}.signs"] = mx.array(signs[t["signs_key"]])
        if f"{path}.bias" in weights:
            out[f"{path}.bias"] = _kept(weights[f"{path}.bias"], recipe.kept_dtype)
        modules[path] = {"bits": bits, "group_size": g, "codebook": book, "block": t["block"]}
        w_hat = dequantize_groups(idx, scales, levels, group_size=g)
        stats = error_stats(w, w_hat) | ({} if h is None else {"calib_output_error": output_error(w, w_hat, h)})
        report.append({"path": path, "bits": bits, "group_size": g} | stats)

    for name, arr in weights.items():
        if name.rpartition(".")[0] not in modules:
            out[name] = _kept(arr, recipe.kept_dtype)
    # mlx's own safetensors writer: it handles bfloat16, which numpy cannot hold
    mx.save_safetensors(str(ctx.out / "model.safetensors"), out, metadata={"format": "mlx"})

    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    config["tqpipe"] = {
        "format_version": FORMAT_VERSION,
        "tqpipe_version": __version__,
        "codebooks": {name: b["levels"] for name, b in books.items()},
        "kept_dtype": recipe.kept_dtype,
        "modules": modules,
    }
    (ctx.out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (fetched / name).exists():
            link_or_copy(fetched / name, ctx.out / name)
    (ctx.out / "pack_report.json").write_text(json.dumps({"plan": plan_file["summary"], "tensors": report}, indent=1))
    errs = np.array([r["rel_mse"] for r in report])
    return {"tensors": len(report), "mean_rel_mse": float(errs.mean()), "max_rel_mse": float(errs.max()),
            "calibration": recipe.calibration.mode}
