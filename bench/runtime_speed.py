"""Run-time speed: tqpipe's packed runtime against mlx-lm's affine quantization and float32.

Each configuration runs in its own process (so that peak memory and BLAS are
its own): a 512-token prompt, then 64 greedy tokens, timed by mlx-lm's
``stream_generate`` (prompt and decode tokens/s, peak memory). The
configurations take turns for ``--rounds`` rounds and the table keeps each
one's best round, since a shared 2-core machine is noisy; the JSON keeps every
round. Configurations:
tqpipe b-bit g32 (native kernels, and the pure-MLX reference with
``TQPIPE_NATIVE=off``), mlx-lm affine b-bit g64 (same bits/weight), and the
float32 model with OpenBLAS and with mlx's bundled reference BLAS.

    python bench/runtime_speed.py                 # SmolLM2-135M, 3 and 4 bits
    python bench/runtime_speed.py --bits 3 --rounds 1

Writes outputs/bench/runtime_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROMPT_TOKENS, DECODE_TOKENS = 512, 64
REFERENCE_DECODE_TOKENS = 8  # the pure-MLX reference is slow; fewer tokens give the same rate


def measure(kind: str, path: str, decode_tokens: int) -> dict:
    """In this process: load one model and time prompt + decode."""
    import tqpipe  # noqa: F401  (the BLAS choice is made here, from TQPIPE_BLAS)

    import mlx.core as mx
    from mlx_lm import load as load_mlx_lm
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    if kind == "tqpipe":
        from tqpipe.runtime import load

        model, tok = load(path, dtype=mx.float32)
    else:
        model, tok = load_mlx_lm(path)
        model.set_dtype(mx.float32)  # the CPU emulates float16 arithmetic: every configuration computes in float32
    ids = (tok.encode("The history of the printing press begins ") * 128)[:PROMPT_TOKENS]
    last = None
    for last in stream_generate(model, tok, ids, max_tokens=decode_tokens, sampler=make_sampler(0.0)):
        pass
    from tqpipe.native import native_kernels

    return {"prompt_tps": last.prompt_tps, "decode_tps": last.generation_tps, "peak_gb": last.peak_memory,
            "decode_tokens": last.generation_tokens, "native": native_kernels() is not None}


def run_child(kind: str, path: str, env: dict[str, str]) -> dict:
    tokens = REFERENCE_DECODE_TOKENS if env.get("TQPIPE_NATIVE") == "off" else DECODE_TOKENS
    out = subprocess.run([sys.executable, __file__, "--child", kind, path, str(tokens)], env=os.environ | env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_models(bits: list[int]) -> tuple[Path, dict[int, Path], dict[int, Path]]:
    from omegaconf import OmegaConf

    from tqpipe.engine import build
    from tqpipe.recipe import Recipe

    outputs = ROOT / "outputs" / "bench" / "runtime_work"
    tq = {}
    for b in bits:
        cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "recipes" / "_smollm2_135m.yaml"))
        recipe = Recipe.from_config({"name": f"runtime_tq{b}", "model": cfg["model"], "kept_dtype": "float16",
                                     "calibration": {"mode": "none"},
                                     "rules": [{"pattern": r"\.(self_attn|mlp)\.", "bits": b}]})
        build(recipe, outputs=outputs, stages=["fetch", "rotate", "codebook", "pack"])
        tq[b] = outputs / recipe.name / "pack"
    fetched = outputs / f"runtime_tq{bits[0]}" / "fetch"
    affine = {}
    for b in bits:
        dest = outputs / f"affine_{b}"
        if not dest.exists():
            subprocess.run([str(BIN / "python"), "-m", "mlx_lm", "convert", "--hf-path", str(fetched), "--mlx-path",
                            str(dest), "-q", "--q-bits", str(b), "--q-group-size", "64"], check=True,
                           capture_output=True)
        affine[b] = dest
    return fetched, tq, affine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--rounds", type=int, default=3, help="runs of every configuration; the best is kept")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "PATH", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, path, tokens = args.child
        print(json.dumps(measure(kind, path, int(tokens))))
        return

    fetched, tq, affine = build_models(args.bits)
    configs = []  # (label, bits/weight, kind, path, env)
    for b in args.bits:
        configs += [(f"tqpipe {b}-bit g32, native kernels", b + 0.5, "tqpipe", tq[b], {}),
                    (f"tqpipe {b}-bit g32, reference kernels", b + 0.5, "tqpipe", tq[b], {"TQPIPE_NATIVE": "off"}),
                    (f"mlx-lm affine {b}-bit g64", b + 0.5, "affine", affine[b], {})]
    configs += [("float32, OpenBLAS", 32, "float32", fetched, {}),
                ("float32, mlx's bundled BLAS", 32, "float32", fetched, {"TQPIPE_BLAS": "off"})]
    runs: dict[str, list[dict]] = {c[0]: [] for c in configs}
    for r in range(args.rounds):
        for label, _, kind, path, env in configs:
            if r and env.get("TQPIPE_NATIVE") == "off":
                continue  # the reference is 20-50x off the pace; one round says so
            runs[label].append(run_child(kind, str(path), env))
            print(f"round {r + 1}: {label}: {runs[label][-1]}", file=sys.stderr)
    rows = []
    for label, bpw, *_ in configs:
        best = {k: max(x[k] for x in runs[label]) for k in ("prompt_tps", "decode_tps")}
        rows.append({"config": label, "bpw": bpw, "rounds": runs[label]} | runs[label][0] | best
                    | {"peak_gb": min(x["peak_gb"] for x in runs[label])})
    machine = f"{platform.machine()}, {os.cpu_count()} cores, mlx CPU"
    dest = ROOT / "outputs" / "bench"
    (dest / "runtime_speed.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    md = [f"# Run-time speed, SmolLM2-135M-Instruct ({machine})", "",
          f"{PROMPT_TOKENS}-token prompt, {DECODE_TOKENS} greedy tokens; mlx-lm's stream_generate figures, "
          f"best of {args.rounds} rounds (the reference: 1 round of {REFERENCE_DECODE_TOKENS} tokens). "
          "Activations and kept tensors in float32 everywhere (the CPU emulates float16); tqpipe reads its float16 scales as stored.", "",
          "| configuration | bits/weight | prompt tok/s | decode tok/s | peak memory (GB) |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['config']} | {r['bpw']} | {r['prompt_tps']:.1f} | {r['decode_tps']:.1f} | {r['peak_gb']:.3f} |")
    (dest / "runtime_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
