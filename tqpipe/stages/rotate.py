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
from tqpipe.quant.quantize import to_numpy
from tqpipe.quant.rotation import random_signs
from tqpipe.recipe import Recipe
from tqpipe.shards import save_arrays
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


def input_moments(recipe: Recipe, fetched: Path, cache: Path) -> Path:
    """The file of unrotated input second moments ``E[x xᵀ]`` of every dense linear layer's shared input,
    from the unquantized model on the calibration text; cached by (model files, calibration text, tokens,
    context), so the variants of a sweep run the model once."""
    from mlx_lm import load as load_unquantized

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
        store, tokens = moments.store, moments.tokens
        log.info("calibration: input moments of %d shared inputs over %d tokens", len(store), tokens)
        del model, moments  # the moments of a large model are GBs (n² floats per input): one copy at a time
        normalized = {}
        for k in sorted(store):  # each sum is freed as its mean is made
            normalized[k] = (to_numpy(store.pop(k) / tokens), "float32")
        save_arrays(tmp, normalized)

    path.parent.mkdir(parents=True, exist_ok=True)
    if cached_entry(path, make):
        log.info("calibration: reused input moments %s", path)
    return path


def calibrate(recipe: Recipe, fetched: Path, cache: Path, plan: list[PlannedTensor],
              signs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rotated input second moments per shared input of the planned (dense) tensors, reading the
    cached unrotated ones one at a time (a large model's are GBs)."""
    from safetensors import safe_open

    from tqpipe.calibration import rotated_moment

    blocks = {t.signs_key: t.block for t in plan if len(t.shape) == 2}  # expert stacks: no moments yet
    with safe_open(str(input_moments(recipe, fetched, cache)), framework="numpy") as raw:
        return {k: to_numpy(rotated_moment(mx.array(raw.get_tensor(k)), mx.array(signs[k]), b))
                for k, b in sorted(blocks.items())}


def run(ctx: StageContext) -> dict[str, Any]:
    fetched = ctx.inputs["fetch"]
    report = plan_report(ctx.recipe, from_folder(fetched))
    log.info("%s", format_plan(report, ctx.recipe.name))
    (ctx.out / "plan.json").write_text(json.dumps(report, indent=1))
    plan = [PlannedTensor.from_json(t) for t in report["tensors"]]
    signs = {t.signs_key: random_signs(t.shape[-1], seed=ctx.recipe.rotation.seed, key=t.signs_key) for t in plan}
    save_file(signs, str(ctx.out / "signs.safetensors"))
    if ctx.recipe.calibration.mode == "gptq":
        hessians = calibrate(ctx.recipe, fetched, ctx.cache, plan, signs)
        save_arrays(ctx.out / "hessians.safetensors", {k: (h, "float32") for k, h in hessians.items()})
    keep = ("tensors", "params", "bytes", "bits_per_weight", "total_bytes", "total_gb")
    return {k: report["summary"][k] for k in keep} | {"sign_vectors": len(signs),
                                                       "calibration": ctx.recipe.calibration.mode}
