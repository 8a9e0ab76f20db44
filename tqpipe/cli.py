"""The ``tqpipe`` command: Hydra composes the config, then a plain function builds it.

    tqpipe                                   # the default recipe, all stages
    tqpipe recipe=smollm2_135m_tq3a_tq2e_g32 stages=[validate,publish]
    tqpipe force=[pack]                      # rebuild pack (and what follows) even if unchanged
    tqpipe recipe=nemotron_super_tq3a_tq2e_g32 plan_only=true   # print the plan from shapes, build nothing
    tqpipe stages=[publish] push=true        # upload the default recipe's folder (publish.repo_id)
    tqpipe -m 'recipe=glob(*,exclude=_*)' stages=[publish]      # re-render every built recipe's card
"""

from __future__ import annotations

import functools
import gc
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from tqpipe.recipe import Recipe, RecipeError
from tqpipe.sources.files import SourceError

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(ROOT / "conf")
log = logging.getLogger("tqpipe")
# recipes can name files that ship with them: ${tqpipe_root:}/recipes/model_configs/...
OmegaConf.register_new_resolver("tqpipe_root", lambda: str(ROOT), replace=True)


def default_jobs(gb_per_job: float = 4.0) -> int:
    """Sweep jobs to run side by side: one per core, as many as memory allows (TQPIPE_JOB_GB each)."""
    import os

    from tqpipe.parallel import available_memory

    per_job = float(os.environ.get("TQPIPE_JOB_GB", gb_per_job)) * 1e9
    return max(1, min(os.cpu_count() or 1, int(available_memory() // per_job)))


OmegaConf.register_new_resolver("tqpipe_jobs", default_jobs, replace=True)


@functools.cache
def _freeze_imports() -> None:
    """Once per process, after the engine's imports (mlx_lm, transformers: ~10^5 objects that are
    never garbage): move them out of the collector's sight, which spares each later full collection,
    and the one at exit, from walking them (~0.1 s a run). Not again in a sweep's later jobs, whose
    garbage would be frozen with them."""
    gc.freeze()


def run(
    recipe: Recipe, *, outputs: Path, stages: list[str], force: list[str], cache: Path | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Build the stages and return the summary the CLI prints."""
    from tqpipe.engine import build

    _freeze_imports()
    results = build(recipe, outputs=outputs, stages=stages, force=force, cache=cache, workers=workers)
    summary: dict[str, Any] = {"recipe": recipe.name, "folder": str(outputs / recipe.name)}
    for r in results:
        summary[r.stage] = r.status
        if r.stage == "validate":
            summary["quality"] = r.manifest["summary"]
    return summary


def format_summary(summary: dict[str, Any], outputs: Path) -> str:
    lines = [f"tqpipe: {summary['recipe']} -> {summary['folder']}"]
    lines.append("  stages: " + ", ".join(f"{k} {v}" for k, v in summary.items() if v in ("built", "skipped", "shared")))
    val = outputs / summary["recipe"] / "validate" / "validate.json"
    if val.exists():
        import json

        v = json.loads(val.read_text())
        q, s = v["quality"], v["size"]
        lines.append(
            f"  size {s['disk_gb']:.3f} GB, {s['bits_per_weight_quantized']:.3f} bits/weight (quantized layers), "
            f"{s['bits_per_weight_model']:.3f} bits/parameter (whole model)"
        )
        lines.append(
            f"  PPL {q['ppl_quant']:.3f} (base {q['ppl_base']:.3f}), KLD {q['kld_mean']:.4f} ± {q['kld_stderr']:.4f} "
            f"nats/token, top-1 {100 * q['top1_agreement']:.1f}% over {q['tokens_scored']} tokens"
        )
        if v.get("speed"):
            sp, mem = v["speed"], v["memory"]
            lines.append(f"  runtime: prompt {sp['prompt_tokens_per_s']:.1f} tok/s, decode {sp['decode_tokens_per_s']:.1f} "
                         f"tok/s, peak memory {mem['peak_gb']:.3f} GB")
        if v.get("checks"):
            failed = [c["name"] for c in v["checks"]["checks"] if not c["passed"]]
            lines.append(f"  generation checks: {v['checks']['passed']} of {v['checks']['total']} passed"
                         + (f" (failed: {', '.join(failed)})" if failed else ""))
    card = outputs / summary["recipe"] / "publish" / "README.md"
    if card.exists():
        lines.append(f"  model + card: {card.parent}")
    return "\n".join(lines)


def show_plan(recipe: Recipe, outputs: Path, *, required: bool) -> None:
    """Print the plan from the best shape source there is; without ``required``, quietly skip
    sources that need a download first (GGUF) or a network that isn't there."""
    from tqpipe.plan import format_plan, plan_report
    from tqpipe.sources.shapes import inventory

    try:
        inv = inventory(recipe, outputs / recipe.name / "fetch")
    except SourceError:
        if required:
            raise
        return
    if inv is None:
        if required:
            raise SourceError(f"recipe.model is a {recipe.model.kind} source: its shapes are known only after "
                              f"fetch; run `tqpipe recipe={recipe.name} stages=[fetch]` first.")
        return
    print(format_plan(plan_report(recipe, inv), recipe.name), flush=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    job = _sweep_job()
    try:
        raw = OmegaConf.to_container(cfg.recipe, resolve=True)
        if cfg.push:  # `push=true`: upload for real (publish is a dry run otherwise)
            raw.setdefault("publish", {})["push"] = True
        if job is not None:  # each variant of a sweep gets its own folder, named from its overrides
            from tqpipe.sweep import job_name, swept_keys

            raw["name"] = job_name(raw["name"], job["overrides"], swept_keys())
        recipe = Recipe.from_config(raw)
        outputs = Path(cfg.outputs)
        if job is not None:
            _job_update(job, recipe=recipe.name, folder=str(outputs / recipe.name), status="running")
        if list(cfg.stages) == ["publish"] and job is not None and not (outputs / recipe.name / "validate").exists():
            log.warning("%s: not built yet (no validate folder); nothing to publish", recipe.name)
            _job_update(job, status="skipped", reason="not built")
            return  # `tqpipe -m 'recipe=glob(*,exclude=_*)' stages=[publish]` re-renders what exists
        show_plan(recipe, outputs, required=bool(cfg.plan_only))
        if cfg.plan_only:
            return
        summary = run(recipe, outputs=outputs, stages=list(cfg.stages), force=list(cfg.force),
                      cache=Path(cfg.cache), workers=int(cfg.workers))
    except (RecipeError, SourceError) as e:
        log.error("%s", e)
        if job is not None:  # one bad variant must not stop the others
            _job_update(job, status="failed", reason=str(e).splitlines()[0])
            return
        sys.exit(2)
    except Exception as e:
        if job is None:
            raise
        log.exception("job %s failed", job["num"])
        _job_update(job, status="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return
    if job is not None:
        _job_update(job, status="done")
    print(format_summary(summary, outputs))


def _sweep_job() -> dict[str, Any] | None:
    """This job's number, overrides and record folder when running in a multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hc = HydraConfig.get()
    return {"num": hc.job.num, "overrides": list(hc.overrides.task), "dir": Path(hc.runtime.output_dir)}


def _job_update(job: dict[str, Any], **fields: Any) -> None:
    from tqpipe.sweep import record_job

    record_job(job["dir"], job=job["num"], overrides=job["overrides"], **fields)
    job.setdefault("recipe", fields.get("recipe", ""))
    detail = f": {fields['reason']}" if "reason" in fields else ""
    log.info("job %s %s %s%s", job["num"], fields.get("status", ""), job["recipe"], detail)


if __name__ == "__main__":
    main()
