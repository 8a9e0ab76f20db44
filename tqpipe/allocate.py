"""Size-budget allocator: the bits for each tensor that meet a size target with the least error.

For every quantizable tensor and every candidate bit width, the tensor is
quantized as the recipe would (data-free, or GPTQ in calibration mode) and its
output error ``‖ΔW X‖² / ‖W X‖²`` is measured on the calibration text's
activations. A greedy pass then starts every tensor at the fewest bits and
buys, step by step, the upgrade with the largest error reduction per byte
until the budget is spent. The result is an ordinary recipe, one rule per
tensor, that inherits everything else from the recipe it started from.

    python -m tqpipe.allocate --recipe smollm2_135m_tq3_g32 --target-bpw 3.5 --bits 2 3 4
"""

from __future__ import annotations

import argparse
import heapq
import logging
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tqpipe.plan import PlannedTensor

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent

ErrorTable = dict[str, dict[int, tuple[int, float]]]  # path -> bits -> (bytes, output error)


def allocate(table: ErrorTable, budget_bytes: int) -> dict[str, int]:
    """Greedy marginal-gain allocation: least total error with ``Σ bytes ≤ budget_bytes``."""
    choice = {p: min(opts) for p, opts in table.items()}
    spent = sum(table[p][b][0] for p, b in choice.items())
    if spent > budget_bytes:
        raise ValueError(f"even the fewest bits need {spent:,} bytes, more than the budget {budget_bytes:,}")

    def next_step(path: str) -> tuple[float, str, int] | None:
        opts = sorted(b for b in table[path] if b > choice[path])
        if not opts:
            return None
        cur_bytes, cur_err = table[path][choice[path]]
        # the best of the next options by gain per byte (handles non-convex error curves)
        best = max(opts, key=lambda b: (cur_err - table[path][b][1]) / max(table[path][b][0] - cur_bytes, 1))
        gain = (cur_err - table[path][best][1]) / max(table[path][best][0] - cur_bytes, 1)
        return (-gain, path, best)

    heap = [s for p in table if (s := next_step(p)) is not None]
    heapq.heapify(heap)
    while heap:
        neg_gain, path, bits = heapq.heappop(heap)
        extra = table[path][bits][0] - table[path][choice[path]][0]
        if neg_gain >= 0 or spent + extra > budget_bytes:
            continue  # no gain, or this upgrade does not fit; a cheaper one elsewhere may
        choice[path], spent = bits, spent + extra
        if (s := next_step(path)) is not None:
            heapq.heappush(heap, s)
    return choice


def measure_errors(recipe, fetched: Path, bits_choices: list[int], group_size: int,
                   cache: Path) -> tuple[ErrorTable, list[PlannedTensor]]:
    """Output error of every planned tensor at every candidate bit width, on calibration activations."""
    import mlx.core as mx

    from tqpipe.model_io import build_model, load_weights, read_config
    from tqpipe.plan import make_plan
    from tqpipe.quant.codebook import lloyd_max_gaussian
    from tqpipe.quant.gptq import output_error
    from tqpipe.quant.quantize import quantize_weight
    from tqpipe.quant.rotation import random_signs, rotate
    from tqpipe.quant.scales import dequantize_groups
    from tqpipe.stages.rotate import calibrate

    model = build_model(read_config(fetched))
    plan = make_plan(recipe, model)
    seed = recipe.rotation.seed
    signs = {t.signs_key: random_signs(t.shape[-1], seed=seed, key=t.signs_key) for t in plan}
    hessians = calibrate(recipe, fetched, cache, plan, signs)
    weights = load_weights(fetched, model)
    levels = {b: lloyd_max_gaussian(b) for b in bits_choices}
    gptq = recipe.calibration.mode == "gptq"
    table: ErrorTable = {}
    for t in tqdm(plan, desc="measure", unit="tensor"):
        w = np.array(rotate(weights[f"{t.path}.weight"].astype(mx.float32), mx.array(signs[t.signs_key]), t.block))
        h = hessians[t.signs_key]
        table[t.path] = {}
        for b in bits_choices:
            idx, s = quantize_weight(w, levels[b], group_size=group_size, scale_method=recipe.codebook.scale_method,
                                     hessian=h if gptq else None, damp=recipe.calibration.damp)
            w_hat = dequantize_groups(idx, s, levels[b], group_size=group_size)
            table[t.path][b] = (replace(t, bits=b, group_size=group_size).bytes, output_error(w, w_hat, h))
    return table, plan


def recipe_text(base: str, name: str, choice: dict[str, int], group_size: int, table: ErrorTable,
                target_bpw: float, params: int, calibration: str = "random_tokens") -> str:
    size = sum(table[p][b][0] for p, b in choice.items())
    err = sum(table[p][b][1] for p, b in choice.items())
    counts = {b: sum(1 for v in choice.values() if v == b) for b in sorted(set(choice.values()))}
    lines = [
        f"# Allocated by `python -m tqpipe.allocate --recipe {base} --target-bpw {target_bpw}`:",
        f"# {8 * size / params:.4f} bits/weight on the quantized layers ({size:,} bytes),",
        f"# summed output error {err:.4f}; tensors per bit width: {counts}.",
        f"# Sensitivities: output errors on the calibration input ({calibration}); edit freely.",
        "defaults:", f"  - {base}", "  - _self_", "", f"name: {name}", "rules:",
    ]
    for path in sorted(choice, key=_natural):
        lines.append(f"  - {{pattern: '^{re.escape(path)}$', bits: {choice[path]}, group_size: {group_size}}}")
    return "\n".join(lines) + "\n"


def _natural(path: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", path)]


def main(argv: list[str] | None = None) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tqpipe.cli import CONF_DIR
    from tqpipe.engine import build
    from tqpipe.recipe import Recipe

    ap = argparse.ArgumentParser(description="Choose bits per tensor for a size budget; writes a recipe.")
    ap.add_argument("--recipe", required=True, help="recipe to start from (its model, calibration, codebook)")
    ap.add_argument("--target-bpw", type=float, required=True, help="bits per weight over the quantized layers")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128])
    ap.add_argument("--name", default=None, help="name of the new recipe (default: <recipe>_auto<bpw>)")
    ap.add_argument("--outputs", type=Path, default=Path("outputs"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"recipe={args.recipe}"])
    recipe = Recipe.from_config(OmegaConf.to_container(cfg.recipe, resolve=True))
    build(recipe, outputs=args.outputs, stages=["fetch"])
    table, plan = measure_errors(recipe, args.outputs / recipe.name / "fetch", args.bits, args.group_size,
                                 args.outputs / "_cache")
    params = sum(t.params for t in plan)
    choice = allocate(table, int(args.target_bpw * params / 8))
    name = args.name or f"{args.recipe}_auto{str(args.target_bpw).replace('.', 'p')}"
    out = ROOT / "recipes" / f"{name}.yaml"
    out.write_text(recipe_text(args.recipe, name, choice, args.group_size, table, args.target_bpw, params,
                               recipe.calibration.text))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
