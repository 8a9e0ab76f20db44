"""Run a recipe's stages in order, skipping those whose inputs did not change."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqpipe import FORMAT_VERSION, __version__
from tqpipe.manifest import read_manifest, sha256_json, write_manifest
from tqpipe.recipe import Recipe, RecipeError
from tqpipe.stages import STAGES
from tqpipe.stages.context import StageContext

log = logging.getLogger(__name__)


@dataclass
class StageOutcome:
    stage: str
    status: str  # "built" or "skipped"
    folder: Path
    manifest: dict[str, Any]


def check_stage_names(stages: list[str], force: list[str]) -> None:
    for label, names in (("stages", stages), ("force", force)):
        bad = [s for s in names if s not in STAGES and not (label == "force" and s == "all")]
        if bad:
            extra = " or 'all'" if label == "force" else ""
            raise RecipeError(f"{label}: unknown stage(s) {bad}; valid: {list(STAGES)}{extra}")


def stage_key(name: str, recipe: Recipe, inputs: dict[str, str]) -> str:
    return sha256_json({
        "stage": name, "settings": STAGES[name].settings(recipe), "inputs": inputs,
        "format": FORMAT_VERSION, "tqpipe": __version__,
    })


def build(
    recipe: Recipe, *, outputs: Path, stages: list[str] | None = None, force: list[str] | None = None,
    cache: Path | None = None, workers: int = 0,
) -> list[StageOutcome]:
    """Build ``stages`` (default: all) of ``recipe`` under ``outputs/<recipe.name>/``.

    ``cache`` (default ``outputs/_cache``) holds downloads that any recipe may reuse.
    ``workers`` caps the processes a stage uses (0: one per core, as memory allows);
    it never changes a result, so it is not part of any stage key.
    """
    stages = list(STAGES) if stages is None else stages
    force = force or []
    check_stage_names(stages, force)
    root = outputs / recipe.name
    cache = cache or outputs / "_cache"
    results = []
    for name in [s for s in STAGES if s in stages]:  # always in pipeline order
        module = STAGES[name]
        inputs, digests = {}, {}
        for need in module.NEEDS:
            m = read_manifest(root / need)
            if m is None or m["key"] != _expected_key(need, recipe, root):
                raise RecipeError(
                    f"stage {name!r} needs {need!r}, which is missing or out of date in {root / need}; "
                    f"run it first, e.g. `tqpipe recipe={recipe.name} stages=[{need},{name}]`."
                )
            inputs[need], digests[need] = root / need, m["digest"]
        key = stage_key(name, recipe, digests)
        folder = root / name
        old = read_manifest(folder)
        if old is not None and old["key"] == key and name not in force and "all" not in force:
            log.info("%-8s up to date, skipped (%s)", name, folder)
            results.append(StageOutcome(name, "skipped", folder, old))
            continue
        if name in SHARED_STAGES:
            manifest, reused = _shared_stage(name, recipe, key, folder, cache, workers)
            results.append(StageOutcome(name, "shared" if reused else "built", folder, manifest))
            continue
        results.append(StageOutcome(name, "built", folder, _run_stage(name, recipe, key, inputs, digests, folder, cache, workers)))
    return results


SHARED_STAGES = ("fetch",)  # keyed by the source alone: recipes (and sweep jobs) of one model fetch it once


def _shared_stage(name: str, recipe: Recipe, key: str, folder: Path, cache: Path,
                  workers: int) -> tuple[dict[str, Any], bool]:
    """Build a stage that depends on nothing recipe-specific once, in ``<cache>/<name>/<key>``, under a lock
    (jobs running side by side wait for the first), and hard-link it into the recipe's folder."""
    from tqpipe.cache import exclusive
    from tqpipe.sources.files import link_or_copy

    shared = cache / name / key
    with exclusive(shared.with_name(f"{key}.lock")):
        done = read_manifest(shared)
        reused = done is not None and done["key"] == key
        if not reused:
            _run_stage(name, recipe, key, {}, {}, shared, cache, workers)
    tmp = folder.with_name(f".{name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in sorted(p for p in shared.rglob("*") if p.is_file()):
        link_or_copy(f, tmp / f.relative_to(shared))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    if reused:
        log.info("%-8s shared: linked from %s", name, shared)
    return read_manifest(folder), reused


def _expected_key(name: str, recipe: Recipe, root: Path) -> str:
    digests = {}
    for need in STAGES[name].NEEDS:
        m = read_manifest(root / need)
        digests[need] = m["digest"] if m else None
    return stage_key(name, recipe, digests)


def _run_stage(
    name: str, recipe: Recipe, key: str, inputs: dict[str, Path], digests: dict[str, str],
    folder: Path, cache: Path, workers: int,
) -> dict[str, Any]:
    tmp = folder.with_name(f".{name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cache.mkdir(parents=True, exist_ok=True)
    log.info("%-8s building -> %s", name, folder)
    started = time.time()
    ctx = StageContext(recipe=recipe, out=tmp, inputs=inputs, cache=cache, workers=workers)
    summary = STAGES[name].run(ctx)
    manifest = write_manifest(
        tmp, stage=name, key=key, config=STAGES[name].settings(recipe), inputs=digests,
        summary=summary, started=started, known_hashes=ctx.hashes,
    )
    if folder.exists():
        stale = folder.with_name(f".{name}.old")
        shutil.rmtree(stale, ignore_errors=True)
        folder.rename(stale)
        shutil.rmtree(stale)
    tmp.rename(folder)
    log.info("%-8s done in %.1fs", name, manifest["seconds"])
    return manifest
