"""Stage manifests: what a finished stage was built from and what it wrote.

A stage's *key* hashes its own recipe section, the digests of the stages it
read, and the tqpipe format version. A folder whose ``manifest.json`` carries
the same key is up to date and is skipped. The manifest is written last, into
a temporary folder that is renamed into place, so a folder with a manifest is
always complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

MANIFEST = "manifest.json"
T = TypeVar("T")
R = TypeVar("R")
_PACKAGES = ("tqpipe", "mlx", "mlx-lm", "numpy", "safetensors", "huggingface_hub", "gguf")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@functools.cache  # one git call per process, not one per stage
def tqpipe_commit() -> str | None:
    """The git commit tqpipe runs from (``+dirty`` with uncommitted changes), or None outside a checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def invocation() -> str:
    """The command line this process was started with, shell-quoted."""
    import shlex
    import sys

    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    commit = tqpipe_commit()
    if commit:
        out["tqpipe_commit"] = commit
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def file_hashes(folder: Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hashlib releases the GIL: files hash on all cores).

    ``known`` gives digests the caller already has (relative path -> sha256), e.g. a
    shard hashed right after it was written; those files are not read again.
    """
    known = known or {}
    names = [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
    todo = [n for n in names if n not in known]
    computed = dict(zip(todo, on_all_cores(lambda n: sha256_file(folder / n), todo)))
    return {n: known.get(n) or computed[n] for n in names}


def on_all_cores(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """``[fn(x) for x in items]`` on one thread per core: for work that releases the GIL, like hashing."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1) or 1) as pool:
        return list(pool.map(fn, items))


def folder_digest(folder: Path) -> str:
    """What a finished stage folder holds, as one hash: its manifest's digest, else its files' hashes."""
    m = read_manifest(folder)
    return m["digest"] if m else sha256_json(file_hashes(folder))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write_manifest(
    folder: Path, *, stage: str, key: str, config: Any, inputs: dict[str, str],
    summary: dict[str, Any], started: float, known_hashes: dict[str, str] | None = None,
) -> dict[str, Any]:
    outputs = file_hashes(folder, known_hashes)
    manifest = {
        "stage": stage,
        "key": key,
        "digest": sha256_json(outputs),
        "config": config,
        "inputs": inputs,
        "outputs": outputs,
        "versions": package_versions(),
        "command": invocation(),
        "seconds": round(time.time() - started, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "summary": summary,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest
