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
    rule: int  # index into recipe.rules; -1 when a recipe.protected entry claimed it
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

    @classmethod
    def from_json(cls, d: dict) -> "PlannedTensor":
        return cls(**{k: tuple(v) if k == "shape" else v for k, v in d.items() if k != "bytes"})


def signs_key(path: str) -> str:
    parent, _, leaf = path.rpartition(".")
    return f"{parent}:{SHARED_INPUTS[leaf]}" if leaf in SHARED_INPUTS else f"{path}:in"


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Dense linear layers and expert stacks (mlx-lm's ``SwitchLinear``, weight ``[experts, out, in]``)."""
    return {p: m for p, m in model.named_modules() if type(m) in (nn.Linear, SwitchLinear)}


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _resolve_layers(protect, n_layers: int | None, index: int) -> set[int]:
    if protect.layers and n_layers is None:
        raise RecipeError(f"recipe.protected[{index}] names layers {protect.layers}, but the model config "
                          "has no num_hidden_layers to count them from")
    bad = [i for i in protect.layers if not -n_layers <= i < n_layers] if protect.layers else []
    if bad:
        raise RecipeError(f"recipe.protected[{index}]: layer index(es) {bad} out of range for a model with "
                          f"{n_layers} layers (valid: 0..{n_layers - 1}, or -1..-{n_layers} from the end)")
    return {i % n_layers for i in protect.layers} if protect.layers else set()


def make_plan(recipe: Recipe, model: nn.Module, n_layers: int | None = None) -> list[PlannedTensor]:
    """Assign every linear layer to the first matching protection, else the first matching rule.

    ``n_layers`` resolves negative block indices in ``recipe.protected`` (default: the
    model's ``args.num_hidden_layers``).
    """
    if n_layers is None:
        n_layers = getattr(getattr(model, "args", None), "num_hidden_layers", None)
    protections = [(p, re.compile(p.pattern), _resolve_layers(p, n_layers, i)) for i, p in enumerate(recipe.protected)]
    rules = [re.compile(r.pattern) for r in recipe.rules]
    modules = linear_modules(model)
    # a rule is in use when its pattern finds a module, even one a protection then claims
    used = {i for i, rx in enumerate(rules) if any(rx.search(p) for p in modules)}
    plan, uncovered = [], []
    for path, mod in sorted(modules.items()):
        m = _LAYER.search(path + ".")
        layer = int(m[1]) if m else None
        choice, where, rule_index = None, "", -1
        for i, (p, rx, layers) in enumerate(protections):
            if rx.search(path) and (not layers or layer in layers):
                choice, where = p, f"recipe.protected[{i}]"
                break
        if choice is None:
            hit = next((i for i, rx in enumerate(rules) if rx.search(path)), None)
            if hit is None:
                uncovered.append(path)
                continue
            choice, where, rule_index = recipe.rules[hit], f"recipe.rules[{hit}] ({recipe.rules[hit].pattern!r})", hit
        if choice.bits == "keep":
            continue
        shape = tuple(mod.weight.shape)
        n = shape[-1]
        if n % choice.group_size:
            raise RecipeError(
                f"{where}: group_size {choice.group_size} does not divide the input width {n} of {path}; "
                f"choose a group size that divides {n}."
            )
        plan.append(PlannedTensor(
            path=path, shape=shape, rule=rule_index,
            bits=choice.bits, group_size=choice.group_size,
            block=hadamard_block_size(n, recipe.rotation.max_block), signs_key=signs_key(path),
            has_bias="bias" in mod,
        ))
    if uncovered:
        shown = ", ".join(uncovered[:8]) + (" …" if len(uncovered) > 8 else "")
        raise RecipeError(
            f"{len(uncovered)} linear layer(s) match no rule and no protected pattern: {shown}. "
            "Add a rule for them (bits: keep leaves them unquantized) or list them under recipe.protected."
        )
    unused = [f"rules[{i}] ({r.pattern!r})" for i, r in enumerate(recipe.rules) if i not in used and not r.optional]
    if unused:
        raise RecipeError(f"recipe {recipe.name!r}: {', '.join(unused)} match(es) no module of this model; "
                          "fix or remove it, or mark it `optional: true`.")
    return plan


# --- the whole-model plan: quantized, kept and dropped tensors, from an inventory of shapes ---

_MX_DTYPES = {"F64": "float32", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "U32": "uint32", "I16": "int16", "U16": "uint16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}
GB, GIB = 1e9, float(1 << 30)


def module_class(path: str) -> str:
    """``backbone.layers.12.mixer.q_proj`` -> ``backbone.layers.*.mixer.q_proj``."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", path)


def plan_report(recipe: Recipe, inventory) -> dict:
    """Every tensor's fate, totals per module class and the predicted size, from shapes alone.

    ``inventory`` is a :class:`tqpipe.sources.shapes.Inventory`. Tensor names go through
    the model's own ``sanitize`` (on lazy placeholders: nothing is allocated), so what is
    planned is exactly what ``pack`` will find.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from tqpipe.model_io import build_model, kept_dtype

    model = build_model(inventory.config)
    planned = make_plan(recipe, model)
    placeholders = {n: mx.zeros(t.shape, dtype=getattr(mx, _MX_DTYPES.get(t.dtype, "float32")))
                    for n, t in inventory.tensors.items()}
    source_params = sum(math.prod(t.shape) for t in inventory.tensors.values())
    sanitized = model.sanitize(placeholders) if hasattr(model, "sanitize") else placeholders
    needed = {k for k, _ in tree_flatten(model.parameters())}
    missing = sorted(needed - set(sanitized))
    if missing:
        shown = ", ".join(missing[:6]) + (" …" if len(missing) > 6 else "")
        raise RecipeError(f"the checkpoint ({inventory.origin}) lacks {len(missing)} tensor(s) the "
                          f"{inventory.config.get('model_type')} model needs: {shown}")
    unused = sorted(set(sanitized) - needed)
    quantized_weights = {f"{t.path}.weight" for t in planned}

    kept: dict[str, dict] = {}
    for name, arr in sanitized.items():
        if name in quantized_weights or name in unused:
            continue
        stored = kept_dtype(model, name, arr.dtype, recipe.kept_dtype)
        nbytes, dtype = arr.size * stored.size, str(stored).removeprefix("mlx.core.")
        row = kept.setdefault(module_class(name), {"class": module_class(name), "tensors": 0, "params": 0,
                                                   "dtype": dtype, "bytes": 0})
        row["tensors"] += 1
        row["params"] += arr.size
        row["bytes"] += nbytes

    classes: dict[str, dict] = {}
    for t in planned:
        key = (module_class(t.path), t.bits, t.group_size)
        row = classes.setdefault(key, {"class": key[0], "tensors": 0, "params": 0,
                                       "bits": t.bits, "group_size": t.group_size, "bytes": 0})
        row["tensors"] += 1
        row["params"] += t.params
        row["bytes"] += t.bytes
    for row in classes.values():
        row["bits_per_weight"] = 8 * row["bytes"] / row["params"]

    model_params = sum(a.size for n, a in sanitized.items() if n not in unused)
    gone = [n for n in inventory.tensors if n not in sanitized]
    surviving_roots = {n.split(".")[0] for n in sanitized}
    dropped_roots = sorted({n.split(".")[0] for n in gone} - surviving_roots)
    q_params, q_bytes = sum(t.params for t in planned), sum(t.bytes for t in planned)
    k_params, k_bytes = sum(r["params"] for r in kept.values()), sum(r["bytes"] for r in kept.values())
    total = q_bytes + k_bytes
    return {
        "origin": inventory.origin,
        "model_type": inventory.config.get("model_type"),
        "summary": {
            "tensors": len(planned), "params": q_params, "bytes": q_bytes,
            "bits_per_weight": 8 * q_bytes / max(q_params, 1),
            "kept_params": k_params, "kept_bytes": k_bytes,
            "total_bytes": total, "total_gb": total / GB, "total_gib": total / GIB,
            "model_params": model_params, "bits_per_parameter": 8 * total / max(model_params, 1),
            "source_params": source_params,
            "source_bytes": sum(math.prod(t.shape) * _dtype_bytes(t.dtype) for t in inventory.tensors.values()),
        },
        "classes": sorted(classes.values(), key=lambda r: -r["bytes"]),
        "kept": sorted(kept.values(), key=lambda r: -r["bytes"]),
        "dropped": {"roots": dropped_roots, "params": source_params - model_params,
                    "note": "not part of the mlx-lm model (its sanitize drops them)" if dropped_roots else "",
                    "unused_after_sanitize": unused},
        "tensors": [t.to_json() for t in planned],
    }


def _dtype_bytes(dtype: str) -> int:
    from tqpipe.sources.shapes import DTYPE_BYTES

    return DTYPE_BYTES.get(dtype, 4)


def format_plan(report: dict, recipe_name: str) -> str:
    """The plan as a table: one row per module class, then kept and dropped, then totals."""
    s = report["summary"]
    lines = [f"plan for {recipe_name} ({report['model_type']}), from {report['origin']}",
             f"  {'quantized class':58s} {'n':>5s} {'params':>9s} {'bits':>4s} {'g':>4s} {'GB':>8s} {'bpw':>6s}"]
    for r in report["classes"]:
        lines.append(f"  {r['class']:58s} {r['tensors']:5d} {_count(r['params']):>9s} {r['bits']:4d} "
                     f"{r['group_size']:4d} {r['bytes'] / GB:8.3f} {r['bits_per_weight']:6.3f}")
    lines.append(f"  {'kept class':58s} {'n':>5s} {'params':>9s} {'dtype':>9s} {'GB':>8s}")
    for r in report["kept"]:
        lines.append(f"  {r['class']:58s} {r['tensors']:5d} {_count(r['params']):>9s} {r['dtype']:>9s} "
                     f"{r['bytes'] / GB:8.3f}")
    d = report["dropped"]
    if d["params"]:
        lines.append(f"  dropped: {_count(d['params'])} params ({', '.join(r + '.*' for r in d['roots']) or 'renamed'}) "
                     f"{d['note']}")
    lines.append(f"  quantized: {s['tensors']} tensors, {_count(s['params'])} params, {s['bits_per_weight']:.3f} bits/weight")
    lines.append(f"  predicted size: {s['total_gb']:.2f} GB = {s['total_gib']:.2f} GiB on disk and in memory "
                 f"(weights only), {s['bits_per_parameter']:.3f} bits/parameter over {_count(s['model_params'])} "
                 f"params; source {s['source_bytes'] / GB:.1f} GB")
    return "\n".join(lines)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
