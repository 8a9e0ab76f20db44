"""Convert a model larger than RAM: a synthetic Nemotron-H with the real Super widths.

Writes a random bfloat16 checkpoint (windows of one 2^28-value Gaussian noise
pool, for speed) in the real HF naming (hidden 4096, 512
experts of 2688×1024, Mamba in_proj 18560×4096, MTP block included) with as
many layers as ``--pattern`` gives, runs ``tqpipe`` with the flagship recipe
``nemotron_super_tq3a_tq2e_g32`` on it (fetch → rotate → codebook → pack), and
samples the peak resident memory of the whole process tree. Then deletes both
(``--keep`` to keep them).

    python bench/pack_scale.py                          # ~37 GB on disk, ~31 GB of it packed
    python bench/pack_scale.py --pattern MEM*E --workdir /big/disk

Writes outputs/bench/pack_scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tqpipe  # noqa: E402,F401  (fast BLAS before mlx)

from measure import env_with, run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SUPER = ROOT / "recipes" / "model_configs" / "nemotron_super_120b.json"
RECIPE = "nemotron_super_tq3a_tq2e_g32"


def gb(n: float) -> float:
    return n / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=SUPER, help="Nemotron-H config.json with the real widths")
    ap.add_argument("--pattern", default="MEMEM*EMEM", help="hybrid_override_pattern of the synthetic model")
    ap.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench" / "pack_scale_work")
    ap.add_argument("--workers", type=int, default=0, help="pack worker processes (0: automatic)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the packed model")
    args = ap.parse_args()

    from tqpipe.model_io import hf_tensor_shapes
    from tqpipe.synthetic import write_checkpoint

    config = json.loads(args.config.read_text())
    config.update(num_hidden_layers=len(args.pattern), hybrid_override_pattern=args.pattern)
    src, out = args.workdir / "source", args.workdir / "outputs"
    shutil.rmtree(args.workdir, ignore_errors=True)
    shapes = hf_tensor_shapes(config)
    largest = max(shapes.items(), key=lambda kv: math.prod(kv[1]))
    print(f"synthetic Nemotron-H, pattern {args.pattern}: {len(shapes)} tensors, "
          f"{gb(2 * sum(math.prod(s) for s in shapes.values())):.1f} GB of bfloat16")
    t0 = time.time()
    on_disk = write_checkpoint(src, config, noise_pool=1 << 28)
    written_s = time.time() - t0
    try:
        cmd = [str(Path(sys.executable).with_name("tqpipe")), f"recipe={RECIPE}", "~recipe.model",
               f"+recipe.model={{kind:local,path:'{src}'}}", "stages=[fetch,rotate,codebook,pack]",
               f"workers={args.workers}", "hydra.run.dir=" + str(out / "logs")]
        print("running:", " ".join(cmd))
        m = run_measured(cmd, env=env_with(TQPIPE_OUTPUTS=str(out)), log=args.workdir / "tqpipe.log")
        if m.returncode:
            raise SystemExit(f"tqpipe failed ({m.returncode}):\n{m.output[-4000:]}")
        root = out / RECIPE
        manifests = {s: json.loads((root / s / "manifest.json").read_text()) for s in ("fetch", "rotate", "pack")}
        plan = manifests["rotate"]["summary"]
        packed = sum(p.stat().st_size for p in (root / "pack").glob("*.safetensors"))
        src_params = sum(math.prod(s) for k, s in shapes.items() if not k.startswith("mtp."))
        pack_s = manifests["pack"]["seconds"]
        result = {
            "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, "
                       f"{round(__import__('os').sysconf('SC_PHYS_PAGES') * __import__('os').sysconf('SC_PAGE_SIZE') / 2**30)} GiB RAM",
            "pattern": args.pattern,
            "source_gb": gb(on_disk), "source_gb_packed_part": gb(2 * src_params),
            "largest_tensor": {"name": largest[0], "shape": list(largest[1]), "gb_bf16": gb(2 * math.prod(largest[1]))},
            "largest_stacked_gb_bf16": gb(2 * config["n_routed_experts"] * config["moe_intermediate_size"]
                                          * (config.get("moe_latent_size") or config["hidden_size"]))
                                       if "E" in args.pattern else None,
            "quantized_params": plan["params"], "bits_per_weight": plan["bits_per_weight"],
            "packed_gb": gb(packed), "write_source_s": written_s,
            "stage_s": {s: manifests[s]["seconds"] for s in manifests},
            "pack_workers": manifests["pack"]["summary"]["workers"],
            "pack_throughput_gb_per_s": gb(2 * src_params) / pack_s,
            "pack_throughput_mparams_per_s": plan["params"] / pack_s / 1e6,
            "total_s": m.seconds, "peak_tree_rss_gb": m.peak_tree_rss_gb * 2**30 / 1e9,
            "peak_process_rss_gb": m.peak_process_rss_gb * 2**30 / 1e9,
        }
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    dest = ROOT / "outputs" / "bench"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pack_scale.json").write_text(json.dumps(result, indent=2))
    md = [
        f"# Streaming pack of a synthetic Nemotron-H ({result['machine']})", "",
        "| measure | value |", "|---|---|",
        f"| source on disk (bf16, MTP included) | {result['source_gb']:.1f} GB |",
        f"| packed part of the source (mlx-lm drops MTP) | {result['source_gb_packed_part']:.1f} GB |",
        f"| largest tensor (per file) | {result['largest_tensor']['name']} {result['largest_tensor']['shape']}, {result['largest_tensor']['gb_bf16']:.2f} GB |",
        f"| largest stacked expert tensor | {result['largest_stacked_gb_bf16'] or 0:.2f} GB |",
        f"| packed model | {result['packed_gb']:.2f} GB, {result['bits_per_weight']:.3f} bits/weight |",
        f"| pack workers | {result['pack_workers']} |",
        f"| pack time | {result['stage_s']['pack']:.0f} s ({result['pack_throughput_gb_per_s']:.3f} GB/s of bf16, "
        f"{result['pack_throughput_mparams_per_s']:.1f} M params/s) |",
        f"| tqpipe total (fetch+rotate+codebook+pack) | {result['total_s']:.0f} s |",
        f"| peak RSS, whole process tree | {result['peak_tree_rss_gb']:.2f} GB |",
        f"| peak RSS, largest single process | {result['peak_process_rss_gb']:.2f} GB |",
    ]
    (dest / "pack_scale.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
