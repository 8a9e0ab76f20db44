"""rotate: plan the model and fix every rotation, without reading a weight.

Writes ``plan.json`` (every quantized tensor with its rule, bits, group, block
and bytes; kept and dropped tensors; totals per module class; the predicted
size, which pack's output matches to the byte) and ``signs.safetensors`` (one ±1 vector per shared input: with the
Hadamard block, that *is* the rotation). In the ``gptq`` calibration mode it
also writes ``hessians.safetensors``: the rotated second moment ``R H Rᵀ`` of
each shared input, from calibration text. ``pack`` applies the rotations as it
streams the weights, so no rotated copy of the model is ever stored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from tqpipe.plan import PlannedTensor, format_plan, plan_report
from tqpipe.quant.rotation import random_signs
from tqpipe.recipe import Recipe
from tqpipe.sources.shapes import from_folder
from tqpipe.stages.context import StageContext

log = logging.getLogger(__name__)

NEEDS = ("fetch",)


def settings(recipe: Recipe) -> dict[str, Any]:
    return {
        "rules": [r.model_dump() for r in recipe.rules],
        "protected": [p.model_dump() for p in recipe.protected],
        "rotation": recipe.rotation.model_dump(),
        "calibration": recipe.calibration.model_dump(exclude={"damp"}),
    }


def calibrate(recipe: Recipe, fetched: Path, plan: list[PlannedTensor],
              signs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rotated input second moments per shared input, from the unquantized model on calibration text."""
    from mlx_lm import load as load_unquantized

    from tqpipe.calibration import InputMoments, rotated_moment
    from tqpipe.eval.texts import token_windows

    c = recipe.calibration
    model, tokenizer = load_unquantized(str(fetched))
    model.set_dtype(mx.float32)
    windows = token_windows(tokenizer, c.text, tokens=c.tokens, context=c.context, split="calibrate")
    dense = {t.path: t.signs_key for t in plan if len(t.shape) == 2}  # expert stacks: no moments yet
    with InputMoments(model, dense) as moments:
        moments.run(tqdm(windows, desc="calibrate", unit="window"))
    blocks = {t.signs_key: t.block for t in plan}
    log.info("calibration: input moments of %d shared inputs over %d tokens", len(moments.store), moments.tokens)
    return {k: np.array(rotated_moment(h / moments.tokens, mx.array(signs[k]), blocks[k]))
            for k, h in moments.store.items()}


def run(ctx: StageContext) -> dict[str, Any]:
    fetched = ctx.inputs["fetch"]
    report = plan_report(ctx.recipe, from_folder(fetched))
    log.info("%s", format_plan(report, ctx.recipe.name))
    (ctx.out / "plan.json").write_text(json.dumps(report, indent=1))
    plan = [PlannedTensor.from_json(t) for t in report["tensors"]]
    signs = {t.signs_key: random_signs(t.shape[-1], seed=ctx.recipe.rotation.seed, key=t.signs_key) for t in plan}
    save_file(signs, str(ctx.out / "signs.safetensors"))
    if ctx.recipe.calibration.mode == "gptq":
        save_file(calibrate(ctx.recipe, fetched, plan, signs), str(ctx.out / "hessians.safetensors"))
    keep = ("tensors", "params", "bytes", "bits_per_weight", "total_bytes", "total_gb")
    return {k: report["summary"][k] for k in keep} | {"sign_vectors": len(signs),
                                                       "calibration": ctx.recipe.calibration.mode}
