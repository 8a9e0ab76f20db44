"""One entry point for quantizing a rotated weight: plain rounding or error feedback."""

from __future__ import annotations

import numpy as np

from tqpipe.quant.gptq import gptq_quantize
from tqpipe.quant.scales import ScaleMethod, quantize_groups


def quantize_weight(
    w: np.ndarray,
    levels: np.ndarray,
    *,
    group_size: int,
    scale_method: ScaleMethod,
    hessian: np.ndarray | None = None,
    damp: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """(indices uint8, fp16 scales) for a rotated ``w``; GPTQ when a rotated input ``hessian`` is given."""
    if hessian is None:
        return quantize_groups(w, levels, group_size=group_size, method=scale_method)
    return gptq_quantize(w, hessian, levels, group_size=group_size, method=scale_method, damp=damp)
