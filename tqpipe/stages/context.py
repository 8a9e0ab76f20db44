"""What every stage receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqpipe.recipe import Recipe


@dataclass(frozen=True)
class StageContext:
    recipe: Recipe
    out: Path  # the folder this stage writes (temporary until the stage succeeds)
    inputs: dict[str, Path]  # finished folders of the stages named in NEEDS
    cache: Path  # shared downloads (outputs/_cache), keyed by their own content
    workers: int = 0  # processes a stage may use; 0 = decide from cores and free memory
    # sha256 of files the stage wrote and already hashed (path relative to ``out``): its manifest reuses them
    hashes: dict[str, str] = field(default_factory=dict)
