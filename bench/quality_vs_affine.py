"""Quality at equal bits: tqpipe's TurboQuant (data-free and calibrated) against mlx's affine.

All schemes fake-quantize every attention and MLP projection of the same float32
model in memory and are scored on the same validation windows against the
unquantized model (KL divergence, perplexity, top-1), with weight error and the
per-layer output error on the validation activations. Affine is mlx's own
``mx.quantize`` (what ``mlx_lm.convert -q`` writes), with its fp16 scale and
bias per group. Calibration (GPTQ) reads the text from its middle on; scoring
reads its start.

    python bench/quality_vs_affine.py                   # SmolLM2-135M, 3 and 4 bits
    python bench/quality_vs_affine.py --bits 3 --model-dir path/to/hf_folder

Writes outputs/bench/quality_vs_affine.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import tqpipe  # noqa: F401  (fast BLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm import load as load_unquantized
from omegaconf import OmegaConf
from tqdm import tqdm

from tqpipe.calibration import InputMoments, rotated_moment
from tqpipe.eval.stats import summarize, token_stats
from tqpipe.eval.texts import token_windows
from tqpipe.plan import linear_modules, signs_key
from tqpipe.quant.codebook import gaussian_mse, lloyd_max_gaussian
from tqpipe.quant.quantize import quantize_weight
from tqpipe.quant.rotation import hadamard_block_size, random_signs, rotate
from tqpipe.quant.scales import dequantize_groups
from tqpipe.runtime.layers import RotatedLinear

ROOT = Path(__file__).resolve().parent.parent


def default_model_dir() -> Path:
    from tqpipe.engine import build
    from tqpipe.recipe import Recipe

    base = OmegaConf.to_container(OmegaConf.load(ROOT / "recipes" / "_smollm2_135m.yaml"))
    recipe = Recipe.from_config({"name": "bench_smollm2_135m", "model": base["model"],
                                 "rules": [{"pattern": "proj", "bits": 4}]})
    build(recipe, outputs=ROOT / "outputs", stages=["fetch"])
    return ROOT / "outputs" / "bench_smollm2_135m" / "fetch"


def affine_layer(lin: nn.Linear, bits: int, group: int) -> nn.Linear:
    w = lin.weight.astype(mx.float32)
    q = mx.quantize(w, group_size=group, bits=bits)
    out = nn.Linear(w.shape[1], w.shape[0], bias="bias" in lin)
    out.weight = mx.dequantize(*q, group_size=group, bits=bits)
    if "bias" in lin:
        out.bias = lin.bias
    return out


def turboquant_layer(lin: nn.Linear, path: str, bits: int, group: int, method: str,
                     hessians: dict[str, np.ndarray] | None, *, levels: np.ndarray | None = None,
                     rotated: bool = True, keep_cols: np.ndarray | None = None) -> RotatedLinear:
    """Fake-quantize one layer. Candidate options: other ``levels``, no rotation (``rotated=False``),
    and input columns ``keep_cols`` (unrotated basis) kept exact in fp16 while the rest is quantized."""
    w = lin.weight.astype(mx.float32)
    n = w.shape[1]
    key = signs_key(path)
    block = hadamard_block_size(n) if rotated else 1
    signs = mx.array(random_signs(n, seed=0, key=key) if rotated else np.ones(n, dtype=np.int8))
    kept = mx.zeros_like(w)
    if keep_cols is not None:
        mask = np.zeros(n, dtype=np.float32)
        mask[keep_cols] = 1.0
        kept, w = w * mx.array(mask), w * mx.array(1.0 - mask)
    w_rot = np.array(rotate(w, signs, block))
    levels = lloyd_max_gaussian(bits) if levels is None else levels
    h = None if hessians is None or not rotated else hessians.get(key)
    idx, s = quantize_weight(w_rot, levels, group_size=group, scale_method=method, hessian=h)
    w_hat = mx.array(dequantize_groups(idx, s, levels, group_size=group)) + rotate(kept.astype(mx.float16).astype(mx.float32), signs, block)
    return RotatedLinear(w_hat, signs, block, lin.bias if "bias" in lin else None)


def uniform_levels(bits: int) -> np.ndarray:
    """A symmetric uniform grid with an exact zero, {-2^(b-1) … 2^(b-1)-1}·c, c MSE-optimal for N(0,1)."""
    k = np.arange(-(1 << (bits - 1)), 1 << (bits - 1), dtype=np.float64)
    c = min(np.linspace(0.05, 2.0, 800), key=lambda c: gaussian_mse(k * c))
    return (k * c).astype(np.float32)


def fitted_levels(model: nn.Module, bits: int, group: int) -> dict[str, np.ndarray]:
    """Levels fitted per tensor class (q/k/v/o/gate/up/down) by Lloyd iteration on the rotated weights,
    each group divided by its RMS: the codebook that fits these weights, still data-free."""
    samples: dict[str, list[np.ndarray]] = {}
    for path, lin in linear_modules(model).items():
        w = lin.weight.astype(mx.float32)
        n = w.shape[1]
        w_rot = np.array(rotate(w, mx.array(random_signs(n, seed=0, key=signs_key(path))), hadamard_block_size(n)))
        g = w_rot.reshape(-1, group)
        z = (g / np.maximum(np.sqrt((g * g).mean(-1, keepdims=True)), 1e-12)).ravel()
        samples.setdefault(path.rsplit(".", 1)[-1], []).append(z[:: max(1, z.size // 200_000)])
    out = {}
    for cls, parts in samples.items():
        z = np.concatenate(parts)
        lv = lloyd_max_gaussian(bits).astype(np.float64)
        for _ in range(30):
            idx = np.searchsorted((lv[1:] + lv[:-1]) / 2, z)
            lv = np.array([z[idx == i].mean() if np.any(idx == i) else lv[i] for i in range(len(lv))])
        out[cls] = np.sort(lv).astype(np.float32)
    return out


def loud_columns(moments: dict[str, mx.array], path: str, frac: float) -> np.ndarray:
    """The ``frac`` input columns with the largest mean square activation."""
    d = np.diag(np.array(moments[signs_key(path)]))
    return np.argsort(d)[::-1][: max(1, int(round(frac * d.size)))]


def calibration_moments(model: nn.Module, tokenizer, tokens: int, context: int,
                        text: str = "pydoc_topics") -> dict[str, np.ndarray]:
    keys = {p: signs_key(p) for p in linear_modules(model)}
    windows = token_windows(tokenizer, text, tokens=tokens, context=context, split="calibrate")
    with InputMoments(model, keys) as m:
        m.run(tqdm(windows, desc="calibrate", unit="window", leave=False))
    blocks = {signs_key(p): hadamard_block_size(lin.weight.shape[1]) for p, lin in linear_modules(model).items()}
    out = {}
    for k, h in m.store.items():
        n = h.shape[0]
        out[k] = np.array(rotated_moment(h / m.tokens, mx.array(random_signs(n, seed=0, key=k)), blocks[k]))
    return out


def raw_moments(model: nn.Module, tokenizer, tokens: int, context: int, text: str) -> dict[str, mx.array]:
    """Unrotated input second moments per shared input (to find the loud columns)."""
    keys = {p: signs_key(p) for p in linear_modules(model)}
    windows = token_windows(tokenizer, text, tokens=tokens, context=context, split="calibrate")
    with InputMoments(model, keys) as m:
        m.run(tqdm(windows, desc="moments", unit="window", leave=False))
    return dict(m.store)


def swapped(base: nn.Module, make) -> list[tuple[str, nn.Linear]]:
    """Replace every linear layer by ``make(path, layer)``; returns the originals to put back."""
    originals = list(linear_modules(base).items())
    base.update_modules(tree_unflatten([(p, make(p, lin)) for p, lin in originals]))
    return originals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--schemes", default="", help="regex: run only the schemes whose name matches")
    ap.add_argument("--probe-only", action="store_true",
                    help="rank schemes by weight and output error only (no KLD): minutes, not tens of minutes")
    args = ap.parse_args()

    model_dir = args.model_dir or default_model_dir()
    base, tokenizer = load_unquantized(str(model_dir))
    base.set_dtype(mx.float32)
    windows = token_windows(tokenizer, "pydoc_topics", tokens=args.tokens, context=args.context, split="validate")
    half = args.context // 2
    keys = {p: signs_key(p) for p in linear_modules(base)}
    with InputMoments(base, keys) as vm:
        base_logits = []
        for w in tqdm(windows, desc="base", unit="window", leave=False):
            lg = base(w[None])[0, half:-1]
            mx.eval(lg, list(vm.store.values()))
            base_logits.append(lg)
    moments = vm.store  # the error ratios do not depend on the normalization
    hessians = calibration_moments(base, tokenizer, args.calib_tokens, args.context)
    synthetic = calibration_moments(base, tokenizer, args.calib_tokens, args.context, text="random_tokens")
    synthetic_raw = raw_moments(base, tokenizer, args.calib_tokens, args.context, text="random_tokens")
    fitted: dict[int, dict[str, np.ndarray]] = {}

    def fitted_for(bits: int) -> dict[str, np.ndarray]:  # fitted once per bit width, on the original weights
        if bits not in fitted:
            fitted[bits] = fitted_levels(base, bits, 32)
        return fitted[bits]

    schemes = []
    for b in args.bits:
        schemes += [
            (f"affine {b}-bit g64 (mlx-lm default)", b + 0.5, lambda p, l, b=b: affine_layer(l, b, 64)),
            (f"affine {b}-bit g32", b + 1.0, lambda p, l, b=b: affine_layer(l, b, 32)),
            (f"tqpipe {b}-bit g32 rms, data-free", b + 0.5, lambda p, l, b=b: turboquant_layer(l, p, b, 32, "rms", None)),
            (f"tqpipe {b}-bit g32 mse, data-free", b + 0.5, lambda p, l, b=b: turboquant_layer(l, p, b, 32, "mse", None)),
            (f"tqpipe {b}-bit g32 gptq random-token H, data-free (default)", b + 0.5,
             lambda p, l, b=b: turboquant_layer(l, p, b, 32, "mse", synthetic)),
            (f"tqpipe {b}-bit g32 gptq (calibrated)", b + 0.5, lambda p, l, b=b: turboquant_layer(l, p, b, 32, "mse", hessians)),
            # candidate engine options, data-free, each against "mse, data-free" above
            (f"candidate {b}-bit g32 mse, no rotation", b + 0.5,
             lambda p, l, b=b: turboquant_layer(l, p, b, 32, "mse", None, rotated=False)),
            (f"candidate {b}-bit g32 mse, uniform grid with zero", b + 0.5,
             lambda p, l, b=b: turboquant_layer(l, p, b, 32, "mse", None, levels=uniform_levels(b))),
            (f"candidate {b}-bit g32 gptq random-token H, uniform grid with zero", b + 0.5,
             lambda p, l, b=b: turboquant_layer(l, p, b, 32, "mse", synthetic, levels=uniform_levels(b))),
            (f"candidate {b}-bit g32 mse, levels fitted per class", b + 0.5,
             lambda p, l, b=b: turboquant_layer(l, p, b, 32, "mse", None,
                                                levels=fitted_for(b)[p.rsplit(".", 1)[-1]])),
            (f"candidate {b}-bit g32 gptq random-token H, levels fitted per class", b + 0.5,
             lambda p, l, b=b: turboquant_layer(l, p, b, 32, "mse", synthetic,
                                                levels=fitted_for(b)[p.rsplit(".", 1)[-1]])),
            (f"candidate {b}-bit g32 gptq random-token H, 1% loud columns fp16", b + 0.5 + 0.16,
             lambda p, l, b=b: turboquant_layer(l, p, b, 32, "mse", synthetic, keep_cols=loud_columns(synthetic_raw, p, 0.01))),
        ]
    rows = []
    for name, bpw, make in [s for s in schemes if re.search(args.schemes, s[0])]:
        t0 = time.time()
        originals = swapped(base, make)
        mx.eval(base.parameters())
        quant_s = time.time() - t0
        res = evaluate_swapped(base, originals, windows, base_logits, moments, probe_only=args.probe_only)
        base.update_modules(tree_unflatten(originals))
        rows.append({"scheme": name, "bpw": bpw, "quantize_seconds": round(quant_s, 1)} | res)
        kld = "" if args.probe_only else f"KLD {res['kld_mean']:.4f}  PPL {res['ppl_quant']:.3f}  top1 {res['top1_agreement']:.3f}  "
        print(f"{name:48s} bpw {bpw:.1f}  {kld}wMSE {res['weight_rel_mse']:.4f}  outErr {res['output_error']:.4f}",
              flush=True)
    write_report(rows, args)


def evaluate_swapped(base, originals, windows, base_logits, moments, *, probe_only: bool = False):
    """Score the model with its layers swapped; errors are measured against the original layers.

    ``probe_only`` skips the logits (KLD, PPL): weight and output errors only, in seconds.
    """
    half = windows.shape[1] // 2
    per_token: dict[str, list] = {}
    for win, bl in zip(windows, [] if probe_only else base_logits):
        st = token_stats(bl, base(win[None])[0, half:-1], win[half + 1:])
        for k, a in st.items():
            per_token.setdefault(k, []).append(a)
    quality = {} if probe_only else summarize({k: np.concatenate(a) for k, a in per_token.items()})
    now = dict(base.named_modules())
    errs, outs = [], []
    for path, lin in originals:
        m = now[path]
        w = lin.weight.astype(mx.float32)
        if isinstance(m, RotatedLinear):  # compare in the rotated basis
            w = rotate(w, m.signs, m.block)
            h = rotated_moment(moments[signs_key(path)], m.signs, m.block)
        else:
            h = moments[signs_key(path)]
        d = m.weight - w
        errs.append(float(mx.sum(d * d) / mx.sum(w * w)))
        outs.append(float(mx.sum((d @ h) * d) / mx.sum((w @ h) * w)))
    return quality | {"weight_rel_mse": float(np.mean(errs)), "output_error": float(np.mean(outs))}


def write_report(rows: list[dict], args) -> None:
    out = ROOT / "outputs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    stem = "quality_probe" if args.probe_only else "quality_vs_affine"
    (out / f"{stem}.json").write_text(json.dumps({"args": vars(args) | {"model_dir": str(args.model_dir)},
                                                            "rows": rows}, indent=1, default=str))
    lines = ["| scheme | bpw | weight rel-MSE | output error | KLD (nats/token) | PPL | top-1 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        q = (f"{r['kld_mean']:.4f} ± {r['kld_stderr']:.4f} | {r['ppl_quant']:.3f} | {r['top1_agreement']:.3f}"
             if "kld_mean" in r else "— | — | —")
        lines.append(f"| {r['scheme']} | {r['bpw']:.1f} | {r['weight_rel_mse']:.4f} | {r['output_error']:.4f} | {q} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
