"""codebook: the Lloyd-Max levels for every bit width the plan uses (data-free)."""

from __future__ import annotations

import json
from typing import Any

from tqpipe.quant.codebook import gaussian_mse, lloyd_max_gaussian
from tqpipe.recipe import Recipe
from tqpipe.stages.context import StageContext

NEEDS = ("rotate",)


def settings(recipe: Recipe) -> dict[str, Any]:
    return {"kind": recipe.codebook.kind, "bits": recipe.quantized_bits()}


def codebook_name(kind: str, bits: int) -> str:
    return f"{kind}_n01_{bits}bit"


def run(ctx: StageContext) -> dict[str, Any]:
    plan = json.loads((ctx.inputs["rotate"] / "plan.json").read_text())["tensors"]
    books = {}
    for bits in sorted({t["bits"] for t in plan}):
        levels = lloyd_max_gaussian(bits)
        books[codebook_name(ctx.recipe.codebook.kind, bits)] = {
            "bits": bits, "levels": [float(v) for v in levels], "gaussian_mse": gaussian_mse(levels),
        }
    (ctx.out / "codebooks.json").write_text(json.dumps(books, indent=1))
    return {name: round(b["gaussian_mse"], 5) for name, b in books.items()}
