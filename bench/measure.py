"""Run a command and measure its wall time and peak memory, worker processes included.

Peak RSS is sampled (every ``interval`` s) over the command's whole process
tree, so memory held by spawned workers counts; the largest single process is
reported too, from the kernel's own high-water mark (``VmHWM``).
"""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(root: int) -> list[int]:
    kids, todo, seen = _children(), [root], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(kids.get(pid, []))
    return seen


@dataclass
class Measured:
    returncode: int
    seconds: float
    peak_tree_rss_gb: float  # largest sum of RSS over the process tree at any sample
    peak_process_rss_gb: float  # largest high-water mark of any one process in the tree
    output: str
    cpu_seconds: float = 0.0  # user + system time of the command and the descendants it waited for


def run_measured(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 interval: float = 0.25, log: Path | None = None) -> Measured:
    started = time.time()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    sink = open(log, "w") if log else subprocess.PIPE
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, text=True)
    peak_tree, peak_proc = 0, 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_tree, peak_proc
        while not done.is_set():
            pids = _tree(proc.pid)
            peak_tree = max(peak_tree, sum(_status_kb(p, "VmRSS") for p in pids))
            peak_proc = max([peak_proc] + [_status_kb(p, "VmHWM") for p in pids])
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.communicate()[0] if sink is subprocess.PIPE else (proc.wait(), "")[1]
    done.set()
    sampler.join()
    if log:
        sink.close()
        out = log.read_text()[-20000:]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    return Measured(proc.returncode, time.time() - started, peak_tree / 2**20, peak_proc / 2**20, out or "", cpu)


def env_with(**extra: str) -> dict[str, str]:
    return os.environ | extra
