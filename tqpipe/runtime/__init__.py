"""Running packed models: quantized layers, kernels and the loader."""

from tqpipe.runtime.layers import TQLinear, TQSwitchLinear
from tqpipe.runtime.loader import load

__all__ = ["TQLinear", "TQSwitchLinear", "load"]
