"""Sweeps: Hydra multirun over recipe params with the joblib and submitit-local launchers, shared work
done once, failed jobs recorded, and the report with its Pareto plot."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tqpipe.sweep import JOB_FILE, job_name, pareto_front, record_job, write_report

FAST = ["recipe.validate.tokens=256", "recipe.validate.context=64",
        "recipe.validate.checks=false", "recipe.validate.max_new_tokens=4", "recipe.validate.speed_prompt_tokens=32",
        "recipe.validate.speed_decode_tokens=4"]


def sweep(tiny: Path, outputs: Path, launcher: str, *overrides: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("tqpipe")
    args = [str(exe), "-m", f"hydra/launcher={launcher}", "~recipe.model",
            f"+recipe.model={{kind:local,path:'{tiny}'}}", *FAST, *overrides, f"hydra.sweep.dir={outputs}/sweep"]
    env = os.environ | {"TQPIPE_OUTPUTS": str(outputs)}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=outputs.parent)


def test_job_names_carry_the_swept_values():
    over = ["recipe.params.mlp_bits=3", "recipe.params.group=64", "recipe.calibration.mode=none",
            "+recipe.model={kind:local,path:/x}", "stages=[pack]"]
    assert job_name("r", over, swept=["recipe.params.mlp_bits", "recipe.params.group"]) == "r--group=64,mlp_bits=3"
    assert job_name("r", over, swept=[]) == "r"  # e.g. recipe=glob(*): each job is its own recipe
    assert job_name("r", ["recipe.rules.0.bits=2"], swept=None) == "r--rules.0.bits=2"


def test_pareto_front_keeps_the_undominated():
    pts = [(2.5, 1.0), (3.0, 0.5), (3.0, 0.7), (3.5, 0.6), (4.5, 0.1)]
    assert pareto_front(pts) == [0, 1, 4]


def test_report_from_an_existing_sweep_folder(tmp_path):
    for i, (bpw, kld) in enumerate([(2.5, 1.2), (3.5, 0.4), (3.6, 0.5)]):
        folder = tmp_path / "out" / f"v{i}"
        (folder / "validate").mkdir(parents=True)
        (folder / "validate" / "validate.json").write_text(json.dumps({
            "quality": {"kld_mean": kld, "kld_stderr": 0.01, "ppl_ratio": 1 + kld, "top1_agreement": 0.8},
            "size": {"bits_per_weight_quantized": bpw, "disk_gb": bpw / 10},
            "speed": {"prompt_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0},
            "checks": {"passed": 1, "total": 5}}))
        (tmp_path / "sweep" / str(i)).mkdir(parents=True)
        record_job(tmp_path / "sweep" / str(i), job=i, recipe=f"r--v{i}", folder=str(folder), status="done")
    (tmp_path / "sweep" / "3").mkdir()
    record_job(tmp_path / "sweep" / "3", job=3, recipe="r--bad", status="failed", reason="bits | 9 is out of range")
    out = write_report(tmp_path / "sweep")
    rows = list(csv.DictReader(open(out["csv"])))
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed"]
    assert [r["pareto"] for r in rows] == ["True", "True", "False", "False"]
    md = out["md"].read_text()
    assert "3 of 4 variants finished" in md and "failed: bits \\| 9 is out of range" in md
    assert out["png"].stat().st_size > 10_000


def test_report_refuses_a_folder_without_jobs(tmp_path):
    with pytest.raises(FileNotFoundError, match=JOB_FILE):
        write_report(tmp_path)


def _check_sweep(outputs: Path, names: list[str], proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((outputs / "sweep" / str(i) / JOB_FILE).read_text()) for i in range(len(names))]
    assert sorted(r["recipe"] for r in records) == sorted(names)
    for name in names:
        assert (outputs / name / "publish" / "README.md").is_file()
    log = proc.stdout + proc.stderr
    assert log.count("reference logits: computed") == 1  # the unquantized logits: once for the sweep
    assert len(list((outputs / "_cache" / "fetch").glob("*/manifest.json"))) == 1  # the model: fetched once
    table = (outputs / "sweep" / "sweep.md").read_text()
    assert all(name in table for name in names)
    return records


def test_two_job_sweep_with_the_joblib_launcher(tiny_llama, tmp_path):
    outputs = tmp_path / "outputs"
    """GPTQ calibration: its input moments are computed once too, and pack's worker processes give way
    to the sweep's own (a loky worker cannot start them)."""
    proc = sweep(tiny_llama, outputs, "local", "hydra.launcher.n_jobs=2", "recipe.params.mlp_bits=2,3",
                 "recipe.calibration.mode=gptq", "recipe.calibration.tokens=256", "recipe.calibration.context=64")
    names = [f"smollm2_135m_tq3a_tq2e_g32--mlp_bits={b}" for b in (2, 3)]
    records = _check_sweep(outputs, names, proc)
    assert all(r["status"] == "done" for r in records), records
    assert len(list((outputs / "_cache" / "moments").glob("*.safetensors"))) == 1
    assert (proc.stdout + proc.stderr).count("calibration: reused input moments") == 1
    assert (outputs / "sweep" / "pareto.png").is_file()
    rows = list(csv.DictReader(open(outputs / "sweep" / "sweep.csv")))
    assert {r["recipe"]: float(r["bits_per_weight"]) for r in rows}[names[1]] > float(rows[0]["bits_per_weight"])


@pytest.mark.slow
def test_submitit_local_sweep_records_a_failed_job_and_keeps_the_other(tiny_llama, tmp_path):
    """group 64 does not divide the tiny model's MLP width (96): that job fails, the other finishes."""
    outputs = tmp_path / "outputs"
    proc = sweep(tiny_llama, outputs, "submitit_local", "recipe.params.group=32,64", "recipe.calibration.mode=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["recipe"]: r for r in (json.loads(p.read_text()) for p in (outputs / "sweep").glob(f"*/{JOB_FILE}"))}
    ok, bad = records["smollm2_135m_tq3a_tq2e_g32--group=32"], records["smollm2_135m_tq3a_tq2e_g32--group=64"]
    assert ok["status"] == "done" and bad["status"] == "failed" and "does not divide" in bad["reason"]
    assert "1 of 2 variants finished" in (outputs / "sweep" / "sweep.md").read_text()
