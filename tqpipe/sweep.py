"""Sweeps: the variants of a recipe built by one Hydra multirun, and the report that compares them.

    tqpipe -m recipe.params.mlp_bits=2,3,4 recipe.params.group=32,64         # 6 variants, one at a time
    tqpipe -m hydra/launcher=local recipe.params.mlp_bits=2,3 ...             # joblib: jobs side by side
    tqpipe-report outputs/multirun/2026-11-27_10-00-00                       # (re)write a sweep's report

Each job builds ``outputs/<recipe>--<its overrides>/`` and leaves a record in
its Hydra job folder (``tqpipe_job.json``: running, done or failed with the
reason). What the jobs share is made once: the fetched model, the calibration
moments and the reference logits (``tqpipe.cache``). When the sweep ends, the
``SweepReport`` callback writes ``sweep.md``, ``sweep.csv`` and ``pareto.png``
(bits per weight against KLD, the Pareto front marked) into the sweep folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger("tqpipe.sweep")

JOB_FILE = "tqpipe_job.json"
COLUMNS = ("job", "recipe", "status", "bits_per_weight", "size_gb", "kld_mean", "kld_stderr", "ppl_ratio",
           "top1", "prompt_tps", "decode_tps", "checks", "reason")


SWEPT_ENV = "TQPIPE_SWEPT"  # the keys the sweep varies, set for the jobs by SweepReport.on_multirun_start


def job_name(base: str, overrides: list[str], swept: list[str] | None = None) -> str:
    """The recipe name plus this job's values of the swept recipe keys (all its recipe overrides when
    ``swept`` is None): ``smollm2_135m_tq3a_tq2e_g32--group=64,mlp_bits=3``."""
    parts = []
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if not key.startswith("recipe.") or key == "recipe.name" or (swept is not None and key not in swept):
            continue
        parts.append(f"{key.removeprefix('recipe.').removeprefix('params.')}={value}")
    if not parts:
        return base
    return f"{base}--" + re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(sorted(parts)))


def record_job(job_dir: Path, **fields: Any) -> None:
    """Write (or update) this job's record, atomically."""
    path = job_dir / JOB_FILE
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(fields)
    tmp = path.with_name(f".{JOB_FILE}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job of the sweep, with the figures of its validate.json when it finished."""
    rows = []
    for path in sorted(sweep_dir.glob(f"*/{JOB_FILE}"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0):
        rec = json.loads(path.read_text())
        row = {"job": path.parent.name, "recipe": rec.get("recipe"), "status": rec.get("status"),
               "reason": rec.get("reason", "")}
        val = Path(rec.get("folder", "")) / "validate" / "validate.json"
        if rec.get("status") == "done" and val.is_file():
            v = json.loads(val.read_text())
            q, size, speed, checks = v["quality"], v["size"], v.get("speed", {}), v.get("checks")
            row |= {"bits_per_weight": size["bits_per_weight_quantized"], "size_gb": size["disk_gb"],
                    "kld_mean": q["kld_mean"], "kld_stderr": q["kld_stderr"], "ppl_ratio": q["ppl_ratio"],
                    "top1": q["top1_agreement"], "prompt_tps": speed.get("prompt_tokens_per_s"),
                    "decode_tps": speed.get("decode_tokens_per_s"),
                    "checks": f"{checks['passed']}/{checks['total']}" if checks else None}
        rows.append(row)
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (fewer bits, lower KLD), by increasing bits."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_report(sweep_dir: Path) -> dict[str, Path]:
    """``sweep.md``, ``sweep.csv`` and, with two finished variants or more, ``pareto.png``."""
    rows = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} holds no tqpipe job records ({JOB_FILE}): not a tqpipe sweep folder")
    done = [r for r in rows if r["status"] == "done" and r.get("kld_mean") is not None]
    front = {done[i]["job"] for i in pareto_front([(r["bits_per_weight"], r["kld_mean"]) for r in done])}
    out = {"csv": sweep_dir / "sweep.csv", "md": sweep_dir / "sweep.md"}
    with open(out["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS, "pareto"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS} | {"pareto": r["job"] in front})
    md = [f"# Sweep {sweep_dir.name}", "",
          f"{len(done)} of {len(rows)} variants finished. ★ marks the Pareto front (no variant has both "
          "fewer bits per weight and a lower KLD).", "",
          "| job | variant | status | bits/weight | size GB | KLD | PPL ratio | top-1 | prompt tok/s | decode tok/s | checks |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] if r["status"] != "failed" else f"failed: {r['reason']}".replace("|", "\\|")
        kld = f"{r['kld_mean']:.4f} ± {r['kld_stderr']:.4f}" if r.get("kld_mean") is not None else "—"
        top1 = f"{100 * r['top1']:.1f} %" if r.get("top1") is not None else "—"
        md.append(f"| {r['job']}{' ★' if r['job'] in front else ''} | {r['recipe']} | {status} | "
                  f"{_fmt(r.get('bits_per_weight'), 3)} | {_fmt(r.get('size_gb'), 3)} | {kld} | "
                  f"{_fmt(r.get('ppl_ratio'))} | {top1} | {_fmt(r.get('prompt_tps'), 1)} | "
                  f"{_fmt(r.get('decode_tps'), 1)} | {_fmt(r.get('checks'))} |")
    if len(done) >= 2:
        out["png"] = sweep_dir / "pareto.png"
        plot_pareto(done, front, out["png"], f"sweep {sweep_dir.name}")
        md += ["", "![bits per weight against KLD](pareto.png)"]
    out["md"].write_text("\n".join(md) + "\n")
    return out


def plot_pareto(rows: list[dict[str, Any]], front: set[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    on = sorted((r for r in rows if r["job"] in front), key=lambda r: r["bits_per_weight"])
    ax.errorbar([r["bits_per_weight"] for r in rows], [r["kld_mean"] for r in rows],
                yerr=[r["kld_stderr"] for r in rows], fmt="o", color="0.55", label="variant", capsize=2)
    ax.plot([r["bits_per_weight"] for r in on], [r["kld_mean"] for r in on], "-o", color="C3", label="Pareto front")
    for r in rows:
        ax.annotate(r["recipe"].split("--", 1)[-1], (r["bits_per_weight"], r["kld_mean"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized layers)")
    ax.set_ylabel("mean KL divergence (nats/token)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def swept_keys() -> list[str] | None:
    value = os.environ.get(SWEPT_ENV)
    return None if value is None else [k for k in value.split(",") if k]


class SweepReport(Callback):
    """Hydra callback: before a multirun, tell the jobs which keys vary (they name their folders by
    them); after it, the report of every job in the sweep folder."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        os.environ[SWEPT_ENV] = ",".join(o.key_or_group for o in overrides if o.is_sweep_override())

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not any(sweep_dir.glob(f"*/{JOB_FILE}")):
            return
        out = write_report(sweep_dir)
        log.info("sweep report: %s", ", ".join(str(p) for p in out.values()))
        print((sweep_dir / "sweep.md").read_text(), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the report of a tqpipe sweep folder (outputs/multirun/<time>).")
    ap.add_argument("sweep_dir", type=Path)
    args = ap.parse_args(argv)
    out = write_report(args.sweep_dir)
    print(out["md"].read_text())


if __name__ == "__main__":
    main()
