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


def input_moments(recipe: Recipe, fetched: Path, cache: Path) -> dict[str, np.ndarray]:
    """Unrotated input second moments ``E[x xᵀ]`` of every dense linear layer's shared input, from the
    unquantized model on the calibration text; cached by (model files, calibration text, tokens, context),
    so the variants of a sweep run the model once."""
    from mlx_lm import load as load_unquantized
    from safetensors.numpy import load_file

    from tqpipe.cache import cached_entry
    from tqpipe.calibration import InputMoments
    from tqpipe.eval.texts import token_windows
    from tqpipe.manifest import folder_digest, sha256_json
    from tqpipe.plan import linear_modules, signs_key

    c = recipe.calibration
    key = sha256_json({"model": folder_digest(fetched), "text": c.text, "tokens": c.tokens,
                       "context": c.context, "what": "input moments, all dense linears", "format": 1})
    path = cache / "moments" / f"{key}.safetensors"

    def make(tmp: Path) -> None:
        model, tokenizer = load_unquantized(str(fetched))
        model.set_dtype(mx.float32)
        windows = token_windows(tokenizer, c.text, tokens=c.tokens, context=c.context, split="calibrate")
        keys = {p: signs_key(p) for p, m in linear_modules(model).items() if m.weight.ndim == 2}
        with InputMoments(model, keys) as moments:
            moments.run(tqdm(windows, desc="calibrate", unit="window"))
        log.info("calibration: input moments of %d shared inputs over %d tokens", len(moments.store), moments.tokens)
        save_file({k: np.array(h / moments.tokens) for k, h in moments.store.items()}, str(tmp))

    path.parent.mkdir(parents=True, exist_ok=True)
    if cached_entry(path, make):
        log.info("calibration: reused input moments %s", path)
    return load_file(str(path))


def calibrate(recipe: Recipe, fetched: Path, cache: Path, plan: list[PlannedTensor],
              signs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rotated input second moments per shared input of the planned (dense) tensors."""
    from tqpipe.calibration import rotated_moment

    raw = input_moments(recipe, fetched, cache)
    blocks = {t.signs_key: t.block for t in plan if len(t.shape) == 2}  # expert stacks: no moments yet
    return {k: np.array(rotated_moment(mx.array(raw[k]), mx.array(signs[k]), b)) for k, b in blocks.items()}


def run(ctx: StageContext) -> dict[str, Any]:
    fetched = ctx.inputs["fetch"]
    report = plan_report(ctx.recipe, from_folder(fetched))
    log.info("%s", format_plan(report, ctx.recipe.name))
    (ctx.out / "plan.json").write_text(json.dumps(report, indent=1))
    plan = [PlannedTensor.from_json(t) for t in report["tensors"]]
    signs = {t.signs_key: random_signs(t.shape[-1], seed=ctx.recipe.rotation.seed, key=t.signs_key) for t in plan}
    save_file(signs, str(ctx.out / "signs.safetensors"))
    if ctx.recipe.calibration.mode == "gptq":
        save_file(calibrate(ctx.recipe, fetched, ctx.cache, plan, signs), str(ctx.out / "hessians.safetensors"))
    keep = ("tensors", "params", "bytes", "bits_per_weight", "total_bytes", "total_gb")
    return {k: report["summary"][k] for k in keep} | {"sign_vectors": len(signs),
                                                       "calibration": ctx.recipe.calibration.mode}
