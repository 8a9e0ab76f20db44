"""Cache entries that several processes may ask for at once (sweep jobs running side by side).

An entry is a file or a folder named by a key of its inputs. The first process
to ask takes an exclusive lock, makes the entry under a temporary name and
renames it into place; the others wait on the lock and then find it done. A
half-made entry (a crash, a kill) keeps its temporary name and is never taken
for a complete one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock, the atomic rename still holds
    fcntl = None


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if missing) for the ``with`` block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        yield


def cached_entry(path: Path, make: Callable[[Path], None]) -> bool:
    """Make ``path`` once: ``make(tmp)`` writes a file or folder at ``tmp``, which is renamed to ``path``.

    Returns True when the entry already existed (made earlier, or meanwhile by another process).
    """
    if path.exists():
        return True
    with exclusive(path.with_name(path.name + ".lock")):
        if path.exists():
            return True
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        if tmp.is_dir():
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)
        make(tmp)
        os.replace(tmp, path)
        return False


def remembered_sha256(files: list[Path], cache: Path) -> dict[Path, str]:
    """sha256 of each file, remembered under ``<cache>/sha256/`` by device, inode, size and mtime.

    A model folder hashed once (or a hard link to its files, as fetch makes) is
    not read again, as git's index does for its work tree. The files still
    unknown are hashed on all cores.
    """
    from tqpipe.manifest import on_all_cores, sha256_file

    folder = cache / "sha256"
    folder.mkdir(parents=True, exist_ok=True)

    def entry(p: Path) -> Path:
        st = p.stat()
        return folder / f"{st.st_dev}-{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"

    def digest(p: Path) -> str:
        remembered = entry(p)
        if remembered.exists():
            return remembered.read_text().strip()
        value = sha256_file(p)
        tmp = remembered.with_name(f".{remembered.name}.{os.getpid()}.tmp")
        tmp.write_text(value)
        os.replace(tmp, remembered)
        return value

    return dict(zip(files, on_all_cores(digest, files)))
