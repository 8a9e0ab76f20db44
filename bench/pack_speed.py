"""Build speed: tqpipe's pack against ``mlx_lm.convert -q`` at the same bits per weight.

Both convert the same unquantized model folder in one run, taking turns for
``--rounds`` rounds (this machine's speed drifts; best and median are kept),
each conversion a fresh process whose whole process tree is sampled for peak
RSS and whose CPU time is counted. tqpipe b-bit group 32 costs b + 0.5
bits/weight, as does mlx affine b-bit group 64 (fp16 scale and bias per 64), so
those are compared. tqpipe runs fetch → rotate → codebook → pack, once
data-free (``calibration.mode=none``) and, with ``--gptq``, also in the default
random-token GPTQ mode.

Three times are kept per conversion: the whole command (interpreter start to
exit, imports included), the work after the imports (mlx: its ``convert()``
call, the same one ``python -m mlx_lm convert`` makes; tqpipe: its stages, the
source hash included) and tqpipe's pack stage alone. Pack throughput is
quantized weights per second of pack against the same weights per second of
``convert()``.

    python bench/pack_speed.py                              # SmolLM2-135M (float32 source), 2/3/4 bits
    python bench/pack_speed.py --synthetic-llama 1.2        # a random ~1.2 B llama in bfloat16
    python bench/pack_speed.py --model-dir path/to/hf --bits 3

Writes outputs/bench/pack_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tqpipe  # noqa: E402,F401  (fast BLAS before mlx)

from measure import env_with, run_measured  # noqa: E402
from quality_vs_affine import default_model_dir as smollm2_folder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STAGES = ("fetch", "rotate", "codebook", "pack")
# mlx_lm's own convert(), timed from after the imports (what `python -m mlx_lm convert -q ...` calls)
MLX_CONVERT = """
import sys, time
from mlx_lm import convert
started = time.perf_counter()
convert(hf_path=sys.argv[1], mlx_path=sys.argv[2], quantize=True, q_bits=int(sys.argv[3]), q_group_size=64)
print(f"convert() seconds: {time.perf_counter() - started:.3f}")
"""


def synthetic_llama(billions: float, folder: Path) -> Path:
    """A random llama (hidden 2048, MLP 8192, 32 heads, SmolLM2's tokenizer) with as many layers as
    reach ``billions``."""
    from tqpipe.model_io import TOKENIZER_FILES
    from tqpipe.synthetic import write_checkpoint

    vocab = 49152
    per_layer = 4 * 2048 * 2048 + 3 * 2048 * 8192
    layers = max(1, round((billions * 1e9 - 2 * vocab * 2048) / per_layer))
    config = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": layers,
              "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "vocab_size": vocab,
              "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False}
    write_checkpoint(folder, config, noise_pool=1 << 26)
    tokenizer = smollm2_folder()
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, folder / name)
    return folder


def _linear_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the weights both tools quantize: every 2-D ``*_proj`` and ``lm_head`` weight."""
    from safetensors import safe_open

    shapes = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                if k.endswith(("_proj.weight", "lm_head.weight")):
                    shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=None, help="HF folder (default: SmolLM2-135M from PyPI)")
    ap.add_argument("--synthetic-llama", type=float, default=None, metavar="BILLIONS",
                    help="use a random llama of about this many billion parameters instead")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--gptq", action="store_true", help="also time tqpipe's default GPTQ mode")
    ap.add_argument("--workers", type=int, default=0, help="tqpipe pack workers (0: automatic)")
    ap.add_argument("--rounds", type=int, default=3, help="conversions per tool, taking turns (best and median kept)")
    args = ap.parse_args()

    work = ROOT / "outputs" / "bench" / "pack_speed_work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if args.synthetic_llama:
        model, label = synthetic_llama(args.synthetic_llama, work / "model"), f"random llama ~{args.synthetic_llama} B (bf16)"
    else:
        model = args.model_dir or smollm2_folder()
        label = str(args.model_dir) if args.model_dir else "SmolLM2-135M-Instruct (float32 safetensors from the GGUF)"
    config = json.loads((model / "config.json").read_text())
    source_gb = folder_bytes(model) / 1e9

    n_quantized = sum(math.prod(v) for k, v in _linear_shapes(model).items())
    runs = []
    for rnd in range(args.rounds):  # the tools take turns, round after round: this VM's speed drifts
        for bits in args.bits:
            out = work / f"mlx_{bits}"
            m = run_measured([str(BIN / "python"), "-c", MLX_CONVERT, str(model), str(out), str(bits)],
                             log=work / f"mlx_{bits}.log")
            if m.returncode:
                raise SystemExit(f"mlx_lm.convert failed:\n{m.output[-3000:]}")
            work_s = float(m.output.rsplit("convert() seconds:", 1)[1].split()[0])
            runs.append({"round": rnd, "tool": "mlx_lm.convert -q", "scheme": f"affine {bits}-bit g64",
                         "bits": bits, "bpw": bits + 0.5, "seconds": m.seconds, "work_seconds": work_s,
                         "pack_seconds": work_s, "cpu_seconds": m.cpu_seconds,
                         "peak_tree_rss_gb": m.peak_tree_rss_gb, "out_gb": folder_bytes(out) / 1e9})
            shutil.rmtree(out, ignore_errors=True)
            for mode in ["none"] + (["gptq"] if args.gptq else []):
                outputs = work / f"tq_{bits}_{mode}"  # a fresh folder and cache: a first build, source hashed
                cmd = [str(BIN / "tqpipe"), "recipe=smollm2_135m_tq3_g32", "recipe.name=speed",
                       "~recipe.model", f"+recipe.model={{kind:local,path:'{model}'}}",
                       f"recipe.rules.0.bits={bits}", "recipe.rules.0.pattern='(_proj|lm_head)$'",
                       f"recipe.calibration.mode={mode}", "stages=[fetch,rotate,codebook,pack]",
                       f"workers={args.workers}", f"hydra.run.dir={outputs}/logs"]
                m = run_measured(cmd, env=env_with(TQPIPE_OUTPUTS=str(outputs)), log=work / f"tq_{bits}_{mode}.log")
                if m.returncode:
                    raise SystemExit(f"tqpipe failed:\n{m.output[-3000:]}")
                stage = {name: json.loads((outputs / "speed" / name / "manifest.json").read_text()) for name in STAGES}
                pack = stage["pack"]
                runs.append({"round": rnd, "tool": "tqpipe", "scheme": f"tq {bits}-bit g32, calibration {mode}",
                             "bits": bits, "bpw": bits + 0.5, "seconds": m.seconds,
                             "work_seconds": sum(x["seconds"] for x in stage.values()),
                             "stage_seconds": {k: x["seconds"] for k, x in stage.items()},
                             "pack_seconds": pack["seconds"], "cpu_seconds": m.cpu_seconds,
                             "pack_phases": pack["summary"].get("seconds"), "workers": pack["summary"]["workers"],
                             "peak_tree_rss_gb": m.peak_tree_rss_gb,
                             "out_gb": folder_bytes(outputs / "speed" / "pack") / 1e9})
                shutil.rmtree(outputs, ignore_errors=True)
            print(f"round {rnd + 1}/{args.rounds}, {bits} bits: " + ", ".join(
                f"{r['tool']} {r['seconds']:.1f} s" for r in runs if r["round"] == rnd and r["bits"] == bits), flush=True)
    shutil.rmtree(work, ignore_errors=True)

    rows = []
    for scheme in dict.fromkeys(r["scheme"] for r in runs):
        mine = [r for r in runs if r["scheme"] == scheme]
        row = min(mine, key=lambda r: r["seconds"]) | {"rounds": len(mine)}
        for key in ("seconds", "work_seconds", "pack_seconds", "cpu_seconds"):
            row[f"best_{key}"] = min(r[key] for r in mine)
            row[f"median_{key}"] = statistics.median(r[key] for r in mine)
        rows.append(row)
    for r in rows:
        base = next(x for x in rows if x["tool"] != "tqpipe" and x["bits"] == r["bits"])
        for key, name in (("seconds", "wall"), ("pack_seconds", "pack")):  # pack: tqpipe's pack vs mlx's convert()
            r[f"{name}_speed_vs_mlx"] = [base[f"best_{key}"] / r[f"best_{key}"],
                                         base[f"median_{key}"] / r[f"median_{key}"]]
            same_round = {x["round"]: x[key] for x in runs if x["scheme"] == base["scheme"]}
            ratios = [same_round[x["round"]] / x[key] for x in runs if x["scheme"] == r["scheme"]]
            r[f"{name}_same_round_ratio_range"] = [min(ratios), max(ratios)]
        r["pack_mweights_per_s"] = n_quantized / r["best_pack_seconds"] / 1e6
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    result = {"model": label, "model_type": config.get("model_type"), "source_gb": source_gb, "machine": machine,
              "quantized_weights": n_quantized, "rows": rows, "runs": runs}
    dest = ROOT / "outputs" / "bench"
    (dest / "pack_speed.json").write_text(json.dumps(result, indent=2))

    def pair(r: dict, key: str) -> str:
        return f"{r[f'best_{key}']:.1f} / {r[f'median_{key}']:.1f}"

    def ratio(r: dict, name: str) -> str:
        (best, median), (lo, hi) = r[f"{name}_speed_vs_mlx"], r[f"{name}_same_round_ratio_range"]
        return f"{best:.2f}× / {median:.2f}× ({lo:.2f}–{hi:.2f}×)"

    md = [f"# Build speed on {label}, {source_gb:.2f} GB source ({machine})", "",
          f"Each tool converted the model {args.rounds} time(s), taking turns; times are best / median over "
          "the rounds, ratios are mlx_lm's time over tqpipe's (best / median, and in brackets the range of "
          "same-round ratios). *Wall*: the whole command, process start to exit. *Work*: after the imports "
          "(mlx: its `convert()` call; tqpipe: its stages fetch, rotate, codebook and pack, including hashing "
          "the source once: every run starts from an empty cache). *Pack*: tqpipe's pack stage; for mlx_lm the "
          "same as work. *CPU*: user + system seconds over all threads and processes. Both quantize every "
          "linear layer including lm_head; mlx_lm also quantizes the input embedding, which tqpipe keeps in "
          "float16.", "",
          "| tool | scheme | bits/weight | wall s | work s | pack s | pack M weights/s | CPU s | "
          "wall vs mlx_lm | pack throughput vs mlx_lm | peak RSS (GB) | output GB |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mine = r["tool"] == "tqpipe"
        md.append(f"| {r['tool']} | {r['scheme']} | {r['bpw']} | {pair(r, 'seconds')} | {pair(r, 'work_seconds')} | "
                  f"{pair(r, 'pack_seconds')} | {r['pack_mweights_per_s']:.0f} | {pair(r, 'cpu_seconds')} | "
                  f"{ratio(r, 'wall') if mine else '—'} | {ratio(r, 'pack') if mine else '—'} | "
                  f"{r['peak_tree_rss_gb'] * 2**30 / 1e9:.2f} | {r['out_gb']:.3f} |")
    (dest / "pack_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
