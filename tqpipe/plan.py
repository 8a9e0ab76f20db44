"""The plan: every quantizable tensor, the rule that claimed it, and its bytes.

Computed from shapes alone (a lazily built mlx-lm model), before any weight is
read, so recipe mistakes surface before heavy work.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

from tqpipe.quant.packing import packed_words
from tqpipe.quant.rotation import hadamard_block_size
from tqpipe.recipe import Recipe, RecipeError

# Sibling projections that read the same activation share one sign vector.
SHARED_INPUTS = {
    "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv",
    "gate_proj": "gate_up", "up_proj": "gate_up",
}


@dataclass(frozen=True)
class PlannedTensor:
    path: str  # module path, e.g. model.layers.0.self_attn.q_proj
    shape: tuple[int, ...]  # (out, in), or (experts, out, in) for a stack of experts
    rule: int  # index into recipe.rules
    bits: int
    group_size: int
    block: int  # Hadamard block along the input
    signs_key: str  # shared-input key the random signs are derived from
    has_bias: bool

    @property
    def params(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes(self) -> int:
        """Packed indices (uint32) + fp16 scales + int8 signs, exactly as pack writes them."""
        *lead, out, n = self.shape
        rows = math.prod(lead) * out
        return rows * packed_words(n, self.bits) * 4 + rows * (n // self.group_size) * 2 + n

    def to_json(self) -> dict:
        return asdict(self) | {"bytes": self.bytes}


def signs_key(path: str) -> str:
    parent, _, leaf = path.rpartition(".")
    return f"{parent}:{SHARED_INPUTS[leaf]}" if leaf in SHARED_INPUTS else f"{path}:in"


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Dense linear layers and expert stacks (mlx-lm's ``SwitchLinear``, weight ``[experts, out, in]``)."""
    return {p: m for p, m in model.named_modules() if type(m) in (nn.Linear, SwitchLinear)}


def make_plan(recipe: Recipe, model: nn.Module) -> list[PlannedTensor]:
    """Assign every linear layer to a protected pattern or the first matching rule."""
    protected = [re.compile(p) for p in recipe.protected]
    rules = [re.compile(r.pattern) for r in recipe.rules]
    plan, uncovered, used = [], [], set()
    for path, mod in sorted(linear_modules(model).items()):
        if any(p.search(path) for p in protected):
            continue
        hit = next((i for i, rx in enumerate(rules) if rx.search(path)), None)
        if hit is None:
            uncovered.append(path)
            continue
        used.add(hit)
        rule = recipe.rules[hit]
        shape = tuple(mod.weight.shape)
        n = shape[-1]
        if n % rule.group_size:
            raise RecipeError(
                f"recipe.rules[{hit}] ({rule.pattern!r}): group_size {rule.group_size} does not "
                f"divide the input width {n} of {path}; choose a group size that divides {n}."
            )
        plan.append(PlannedTensor(
            path=path, shape=shape, rule=hit, bits=rule.bits, group_size=rule.group_size,
            block=hadamard_block_size(n, recipe.rotation.max_block), signs_key=signs_key(path),
            has_bias="bias" in mod,
        ))
    if uncovered:
        shown = ", ".join(uncovered[:8]) + (" …" if len(uncovered) > 8 else "")
        raise RecipeError(
            f"{len(uncovered)} linear layer(s) match no rule and no protected pattern: {shown}. "
            "Add a rule for them or list them under recipe.protected."
        )
    unused = [f"rules[{i}] ({r.pattern!r})" for i, r in enumerate(recipe.rules) if i not in used]
    if unused:
        raise RecipeError(f"recipe {recipe.name!r}: {', '.join(unused)} match(es) no module of this model; fix or remove.")
    return plan
