"""Recipes compose through Hydra and validate; bad recipes fail early and clearly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tqpipe.cli import CONF_DIR
from tqpipe.recipe import Recipe, RecipeError

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml") if not p.stem.startswith("_"))


def compose_recipe(name: str, overrides: list[str] = ()) -> Recipe:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"recipe={name}", *overrides])
    return Recipe.from_config(OmegaConf.to_container(cfg.recipe, resolve=True))


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_composes_and_validates(name):
    recipe = compose_recipe(name)
    assert recipe.name == name  # the output folder is named after the recipe file
    assert recipe.rules


def test_default_recipe_is_3bit_attention_2bit_mlp_g32():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config")
    r = Recipe.from_config(OmegaConf.to_container(cfg.recipe, resolve=True))
    assert r.name == "smollm2_135m_tq3a_tq2e_g32"
    assert [(x.bits, x.group_size) for x in r.rules] == [(3, 32), (2, 32)]
    attn, mlp = re.compile(r.rules[0].pattern), re.compile(r.rules[1].pattern)
    for p in ("q", "k", "v", "o"):
        assert attn.search(f"model.layers.7.self_attn.{p}_proj") and not mlp.search(f"model.layers.7.self_attn.{p}_proj")
    for p in ("gate", "up", "down"):
        assert mlp.search(f"model.layers.7.mlp.{p}_proj") and not attn.search(f"model.layers.7.mlp.{p}_proj")
    assert list(cfg.stages) == ["fetch", "rotate", "codebook", "pack", "validate", "publish"]


def test_unknown_recipe_lists_the_available_ones():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as e:
        compose_recipe("no_such_recipe")
    assert "smollm2_135m_tq3a_tq2e_g32" in str(e.value)


@pytest.mark.parametrize(
    "override, expect",
    [
        ("recipe.rules.0.bits=9", "recipe.rules.0.bits"),
        ("recipe.rules.0.bits=0", "recipe.rules.0.bits"),
        ("recipe.rules.1.group_size=48", "must be one of 32, 64 or 128 (got 48)"),
        ("recipe.rules.0.pattern='(unclosed'", "does not compile"),
        ("+recipe.colour=blue", "recipe.colour: is not a recipe setting"),
        ("recipe.codebook.scale_method=median", "must be one of 'mse' or 'rms'"),
    ],
)
def test_bad_values_name_the_key_and_the_choices(override, expect):
    with pytest.raises(RecipeError) as e:
        compose_recipe("smollm2_135m_tq3a_tq2e_g32", [override])
    assert expect in str(e.value)
