"""Evaluation texts that need no download."""

from __future__ import annotations


def pydoc_topics() -> str:
    """The prose of the standard library's ``pydoc_data.topics`` (ships with every Python)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


TEXTS = {"pydoc_topics": pydoc_topics}
