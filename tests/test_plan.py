"""The plan: every tensor's fate decided from shapes alone, and each recipe mistake caught before a weight is read."""

from __future__ import annotations

import math

import pytest

from tqpipe.model_io import build_model
from tqpipe.plan import make_plan, plan_report
from tqpipe.recipe import Recipe, RecipeError
from tqpipe.sources.shapes import DTYPE_BYTES, from_folder

from conftest import NEMOTRON_TWIN, TINY_LLAMA

ATTN, MLP = r"self_attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$"


def recipe(rules, protected=(), **extra) -> Recipe:
    return Recipe.from_config({"name": "t", "model": {"kind": "local", "path": "."}, "rules": rules,
                               "protected": list(protected), **extra})


def plan_of(r: Recipe, config=TINY_LLAMA):
    return {t.path: t for t in make_plan(r, build_model(config))}


def test_rule_matching_nothing_is_an_error_unless_optional():
    rules = [{"pattern": ATTN, "bits": 3}, {"pattern": MLP, "bits": 2}, {"pattern": r"\.experts\.", "bits": 2}]
    with pytest.raises(RecipeError, match=r"rules\[2\] \('\\\\.experts\\\\.'\) match\(es\) no module"):
        plan_of(recipe(rules))
    rules[2]["optional"] = True
    assert len(plan_of(recipe(rules))) == 14


def test_group_size_that_does_not_divide_the_input_names_the_tensor():
    # the tiny llama's MLP width is 96: group 64 does not divide down_proj's input
    with pytest.raises(RecipeError, match=r"rules\[1\].*group_size 64 does not divide the input width 96 of "
                                          r"model\.layers\.0\.mlp\.down_proj"):
        plan_of(recipe([{"pattern": ATTN, "bits": 3}, {"pattern": MLP, "bits": 2, "group_size": 64}]))


def test_uncovered_tensors_are_listed():
    with pytest.raises(RecipeError, match=r"14 linear layer\(s\) match no rule.*model\.layers\.0\.mlp\.down_proj"):
        plan_of(recipe([{"pattern": r"nothing_here", "bits": 3, "optional": True}]))


def test_keep_leaves_modules_unquantized():
    plan = plan_of(recipe([{"pattern": ATTN, "bits": 3}, {"pattern": MLP, "bits": "keep"}]))
    assert len(plan) == 8 and all("self_attn" in p for p in plan)


def test_protection_by_layer_index_overrides_the_rules():
    r = recipe([{"pattern": ATTN, "bits": 3}, {"pattern": MLP, "bits": 2}],
               protected=[{"layers": [-1]}, {"pattern": r"\.mlp\.", "layers": [0], "bits": 4}])
    plan = plan_of(r)
    assert not any(".layers.1." in p for p in plan)  # the last of 2 blocks is kept whole
    assert plan["model.layers.0.mlp.up_proj"].bits == 4 and plan["model.layers.0.mlp.up_proj"].rule == -1
    assert plan["model.layers.0.self_attn.q_proj"].bits == 3
    with pytest.raises(RecipeError, match=r"protected\[0\]: layer index\(es\) \[5\] out of range .* 2 layers"):
        plan_of(recipe([{"pattern": ATTN, "bits": 3}, {"pattern": MLP, "bits": 2}], protected=[{"layers": [5]}]))


def test_plain_string_protection_is_a_kept_regex():
    r = recipe([{"pattern": ATTN, "bits": 3}, {"pattern": MLP, "bits": 2}], protected=[r"\.v_proj$"])
    assert r.protected[0].bits == "keep"
    assert not any(p.endswith("v_proj") for p in plan_of(r))


def test_expert_stacks_are_planned_as_3d_tensors():
    r = recipe([{"pattern": r"\.mixer\.", "bits": 2}], protected=[r"^lm_head$"])
    plan = plan_of(r, NEMOTRON_TWIN)
    fc1 = plan["backbone.layers.1.mixer.switch_mlp.fc1"]
    assert fc1.shape == (8, 32, 32) and fc1.params == 8 * 32 * 32


def test_report_accounts_for_every_source_tensor(tiny_llama):
    r = recipe([{"pattern": ATTN, "bits": 3}, {"pattern": MLP, "bits": 2}])
    inv = from_folder(tiny_llama)
    rep = plan_report(r, inv)
    s = rep["summary"]
    assert s["params"] + s["kept_params"] == s["model_params"] == s["source_params"]
    assert s["source_bytes"] == sum(math.prod(t.shape) * DTYPE_BYTES[t.dtype] for t in inv.tensors.values())
    assert {row["class"] for row in rep["kept"]} >= {"model.embed_tokens.weight", "model.norm.weight"}
    assert rep["dropped"]["params"] == 0


def test_hub_shapes_offline_say_how_to_plan_without_the_hub(monkeypatch):
    from huggingface_hub import constants

    from tqpipe.sources.files import SourceError
    from tqpipe.sources.shapes import from_hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match=r"cannot read the shapes of org/model@main.*`model\.config`"):
        from_hub("org/model", "main")

