"""Small file helpers shared by the model sources."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tqpipe.manifest import sha256_file

MODEL_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt")


class SourceError(RuntimeError):
    """A model source that cannot be fetched; the message says why and what to do."""


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (same filesystem), else copy it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copy2(src.resolve(), dst)


def copy_model_files(src: Path, dst: Path) -> list[str]:
    """Bring a Hugging Face folder's config, weights and tokenizer files into ``dst``."""
    names = sorted({p.name for pat in MODEL_PATTERNS for p in src.glob(pat) if p.is_file()})
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise SourceError(
            f"{src} is not a Hugging Face model folder with safetensors weights "
            "(needs config.json and *.safetensors; pickle checkpoints are not loaded)"
        )
    for name in names:
        link_or_copy(src / name, dst / name)
    return names


def check_sha256(path: Path, expected: str | None) -> str:
    actual = sha256_file(path)
    if expected is not None and actual != expected.lower():
        raise SourceError(
            f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}. "
            "The file changed or the recipe's sha256 is wrong; refusing to convert it."
        )
    return actual
