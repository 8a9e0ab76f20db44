"""Evaluation and calibration texts that need no download, cut into token windows.

Validation reads a text from its start; calibration reads the same text from
its middle on, so that a calibrated model is never scored on what it saw.
"""

from __future__ import annotations

from typing import Any, Literal

import mlx.core as mx
import numpy as np


def pydoc_topics() -> str:
    """The prose of the standard library's ``pydoc_data.topics`` (ships with every Python)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


TEXTS = {"pydoc_topics": pydoc_topics}


def random_tokens(vocab_size: int, n: int, *, seed: int = 0) -> list[int]:
    """``n`` token ids drawn uniformly from the vocabulary (numpy PCG64, fixed seed)."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=n).tolist()


def token_windows(
    tokenizer: Any, text: str, *, tokens: int, context: int, split: Literal["validate", "calibrate"],
) -> mx.array:
    """``[tokens // context, context]`` token ids: from the start (validate) or the middle (calibrate)."""
    if text == "random_tokens":
        if split == "validate":
            raise ValueError("random_tokens is for calibration only; validate on a real text")
        ids, start = random_tokens(len(tokenizer.vocab), tokens), 0
    else:
        ids = tokenizer.encode(TEXTS[text]())
        start = 0 if split == "validate" else len(ids) // 2
    if split == "validate" and tokens > len(ids) // 2:
        raise ValueError(f"text {text!r} has {len(ids)} tokens; {tokens} for validation would overlap calibration")
    if start + tokens > len(ids):
        raise ValueError(f"text {text!r} has {len(ids)} tokens; asking {tokens} from token {start} is too many")
    n = tokens - tokens % context
    if n == 0:
        raise ValueError(f"tokens={tokens} is less than one window of context={context}")
    return mx.array(ids[start:start + n]).reshape(-1, context)
