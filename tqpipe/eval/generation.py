"""Greedy generation with speed and memory figures, through mlx-lm."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import stream_generate


def greedy(model: nn.Module, tokenizer: Any, prompt: str | list[int], max_tokens: int) -> dict[str, Any]:
    """Continue a raw ``prompt`` (text or token ids) greedily; report text, prompt and decode
    tokens/s and peak memory (``mx.get_peak_memory``: model, cache and activations)."""
    mx.reset_peak_memory()
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        text += last.text
    if last is None:
        return {"text": "", "tokens": 0}
    return {
        "prompt": prompt if isinstance(prompt, str) else f"<{len(prompt)} tokens>",
        "prompt_tokens": last.prompt_tokens,
        "text": text,
        "tokens": last.generation_tokens,
        "prompt_tokens_per_s": last.prompt_tps,
        "decode_tokens_per_s": last.generation_tps,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }
