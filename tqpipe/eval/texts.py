"""Evaluation and calibration texts that need no download, cut into token windows.

Validation reads a text from its start; calibration reads the same text from
its middle on, so that a calibrated model is never scored on what it saw.
"""

from __future__ import annotations

from typing import Any, Literal

import mlx.core as mx


def pydoc_topics() -> str:
    """The prose of the standard library's ``pydoc_data.topics`` (ships with every Python)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


TEXTS = {"pydoc_topics": pydoc_topics}


def token_windows(
    tokenizer: Any, text: str, *, tokens: int, context: int, split: Literal["validate", "calibrate"],
) -> mx.array:
    """``[tokens // context, context]`` token ids: from the start (validate) or the middle (calibrate)."""
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
