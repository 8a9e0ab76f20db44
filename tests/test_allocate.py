"""The size-budget allocator."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tqpipe.allocate import allocate, recipe_text


def random_table(n: int, seed: int):
    rng = np.random.default_rng(seed)
    table = {}
    for i in range(n):
        size = int(rng.integers(100, 1000))
        sens = float(rng.uniform(0.1, 10))
        # error falls ~4x per extra bit, as for a Gaussian quantizer
        table[f"layer.{i}"] = {b: (size * b, sens * 4.0 ** -b) for b in (2, 3, 4)}
    return table


def brute_force(table, budget):
    paths = list(table)
    best = None
    for bits in itertools.product(*[sorted(table[p]) for p in paths]):
        size = sum(table[p][b][0] for p, b in zip(paths, bits))
        err = sum(table[p][b][1] for p, b in zip(paths, bits))
        if size <= budget and (best is None or err < best[0]):
            best = (err, dict(zip(paths, bits)))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_greedy_respects_budget_and_is_near_optimal(seed):
    table = random_table(6, seed)
    full = sum(v[4][0] for v in table.values())
    low = sum(v[2][0] for v in table.values())
    budget = (full + low) // 2
    choice = allocate(table, budget)
    size = sum(table[p][b][0] for p, b in choice.items())
    err = sum(table[p][b][1] for p, b in choice.items())
    best_err, _ = brute_force(table, budget)
    assert size <= budget
    assert err <= 1.25 * best_err  # greedy on convex curves is close to the optimum


def test_sensitive_layers_get_the_bits():
    table = {"a": {2: (100, 1.0), 4: (200, 0.01)}, "b": {2: (100, 0.01), 4: (200, 0.0001)}}
    assert allocate(table, 300) == {"a": 4, "b": 2}


def test_impossible_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="fewest bits"):
        allocate({"a": {2: (100, 1.0)}}, 50)


def test_recipe_text_is_a_loadable_recipe():
    from omegaconf import OmegaConf

    table = {"model.layers.0.mlp.up_proj": {2: (10, 0.1), 3: (14, 0.03)}}
    text = recipe_text("base", "auto", {"model.layers.0.mlp.up_proj": 3}, 32, table, 3.5, 32)
    cfg = OmegaConf.create(text)
    assert cfg.defaults[0] == "base" and cfg.rules[0].bits == 3
    import re

    assert re.search(cfg.rules[0].pattern, "model.layers.0.mlp.up_proj")
    assert not re.search(cfg.rules[0].pattern, "model.layers.10.mlp.up_proj")


def test_measured_errors_fall_with_bits_on_a_real_model(tiny_llama, tmp_path):
    from tqpipe.allocate import measure_errors
    from tqpipe.recipe import Recipe

    recipe = Recipe.from_config({
        "name": "tiny", "model": {"kind": "local", "path": str(tiny_llama)},
        "rules": [{"pattern": r"proj$", "bits": 3}],
        "calibration": {"tokens": 256, "context": 64},
    })
    table, plan = measure_errors(recipe, tiny_llama, [2, 3, 4], 32, tmp_path / "cache")
    assert set(table) == {t.path for t in plan} and len(table) == 14
    for path, opts in table.items():
        sizes = [opts[b][0] for b in (2, 3, 4)]
        errs = [opts[b][1] for b in (2, 3, 4)]
        assert sizes[0] < sizes[1] < sizes[2]
        assert errs[0] > errs[1] > errs[2] > 0, path
