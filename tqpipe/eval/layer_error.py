"""Per-layer output error of a quantized model on real activations, and its picture.

For each quantized layer, with ``H = Σ x xᵀ`` of its input on the validation
text (captured in the quantized model: the inputs the layer really sees) and
both weights in the rotated basis: ``‖ΔW X‖² / ‖W X‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``, beside the plain
weight error ``‖ΔW‖² / ‖W‖²``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from tqpipe.calibration import rotated_moment
from tqpipe.quant.rotation import rotate
from tqpipe.runtime.layers import RotatedLinear


def layer_errors(base: nn.Module, twin: nn.Module, moments: dict[str, mx.array],
                 keys: dict[str, str]) -> list[dict[str, Any]]:
    """Rows ``{path, layer, kind, rel_mse, output_error}`` for every RotatedLinear of ``twin``."""
    base_mods = dict(base.named_modules())
    rows = []
    for path, q in twin.named_modules():
        if type(q) is not RotatedLinear:  # dense layers; expert stacks have no moments yet
            continue
        w = rotate(base_mods[path].weight.astype(mx.float32), q.signs, q.block)
        d = q.weight - w
        h = rotated_moment(moments[keys[path]], q.signs, q.block)
        out_err = mx.sum((d @ h) * d) / mx.sum((w @ h) * w)
        rel_mse = mx.sum(d * d) / mx.sum(w * w)
        m = re.search(r"\.(\d+)\.", path)
        rows.append({"path": path, "layer": int(m.group(1)) if m else -1, "kind": path.rsplit(".", 1)[-1],
                     "rel_mse": float(rel_mse), "output_error": float(out_err)})
    return rows


def plot_layer_errors(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Output error across layers, one line per module kind (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for kind in sorted({r["kind"] for r in rows}):
        pts = sorted((r["layer"], r["output_error"]) for r in rows if r["kind"] == kind)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=kind)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("output error ‖ΔW·X‖² / ‖W·X‖²")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
