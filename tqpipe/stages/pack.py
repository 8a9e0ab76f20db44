"""pack: rotate, quantize and bit-pack each planned weight -> a loadable MLX model folder.

Streams tensor by tensor. Data-free with the native extension, this process
does it all: it reads the next tensor while a helper thread runs the C++
quantizer, which spreads the last one's rows over the cores; otherwise worker
processes (one per core, fewer when memory is short) read a
weight lazily from the fetched safetensors, rotate it with the signs from
``rotate``, quantize it in row chunks (GPTQ error feedback when ``rotate``
wrote Hessians) and return the packed result. A background thread writes it
into safetensors shards of bounded size. Memory therefore follows the largest
tensor, not the model.

Writes ``model.safetensors`` (or shards plus ``model.safetensors.index.json``)
with the packed layers and the kept tensors, ``config.json`` with a ``tqpipe``
section that tells the loader everything (format version, codebooks and, per
module: bits, group size, codebook, rotation block and the key of the input it
shares), the tokenizer files, and
``pack_report.json`` with each tensor's reconstruction error.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from tqpipe import FORMAT_VERSION, __version__
from tqpipe.model_io import TOKENIZER_FILES, build_model, kept_dtype, load_weights, read_config
from tqpipe.native import native_kernels
from tqpipe.parallel import auto_workers, ordered_map
from tqpipe.quant.quantize import GPTQ_CHUNK_ELEMENTS, native_rows, quantize_native_rows, quantize_tensor
from tqpipe.recipe import Recipe
from tqpipe.runtime.loader import MODEL_FILE, MODEL_FILE_SOURCE
from tqpipe.shards import ShardWriter
from tqpipe.sources.files import link_or_copy
from tqpipe.stages.codebook import codebook_name
from tqpipe.stages.context import StageContext

log = logging.getLogger(__name__)

NEEDS = ("fetch", "rotate", "codebook")
READ_CACHE_BYTES = (32 << 20, 1 << 30)  # mlx's buffer cache while packing: at least its default, at most 1 GiB


def settings(recipe: Recipe) -> dict[str, Any]:
    return {"scale_method": recipe.codebook.scale_method, "kept_dtype": recipe.kept_dtype,
            "damp": recipe.calibration.damp}


# --- worker side: each worker process opens the model lazily once, then packs tensors on request

_worker: dict[str, Any] = {}


def _init_worker(fetched: str, rotated: str, levels: dict[str, list[float]], scale_method: str,
                 damp: float) -> None:
    folder = Path(fetched)
    _worker["weights"] = load_weights(folder, build_model(read_config(folder)))
    # mlx keeps freed buffers up to this much for the next tensor to reuse: reading into fresh pages
    # costs a fault and a zeroing per page, 4x slower (bounded so memory still follows the largest tensor)
    largest = max(w.nbytes for w in _worker["weights"].values())
    _worker["cache_limit_before"] = mx.set_cache_limit(max(READ_CACHE_BYTES[0], min(2 * largest, READ_CACHE_BYTES[1])))
    with safe_open(str(Path(rotated) / "signs.safetensors"), framework="numpy") as f:
        _worker["signs"] = {k: f.get_tensor(k) for k in f.keys()}
    hessians = Path(rotated) / "hessians.safetensors"
    _worker["hessians"] = hessians if hessians.exists() else None
    _worker["levels"] = {k: np.asarray(v, dtype=np.float32) for k, v in levels.items()}
    _worker["scale_method"], _worker["damp"] = scale_method, damp


def _hessian(key: str) -> np.ndarray | None:
    if _worker["hessians"] is None:
        return None
    with safe_open(str(_worker["hessians"]), framework="numpy") as f:
        return f.get_tensor(key) if key in f.keys() else None


def _read(t: dict[str, Any]) -> tuple[mx.array, float]:
    """The planned tensor's source weight, evaluated, and the seconds reading it took."""
    # pop: once evaluated, an array kept in the dict would hold its data for the worker's lifetime
    w = _worker["weights"].pop(f"{t['path']}.weight")
    started = time.perf_counter()
    mx.eval(w)
    return w, time.perf_counter() - started


def _quantize(t: dict[str, Any], w: mx.array, read_s: float) -> tuple[str, Any, float, float]:
    started = time.perf_counter()
    q = quantize_tensor(
        w, _worker["signs"][t["signs_key"]], t["block"], _worker["levels"][t["codebook"]],
        bits=t["bits"], group_size=t["group_size"], scale_method=_worker["scale_method"],
        hessian=_hessian(t["signs_key"]), damp=_worker["damp"],
    )
    return t["path"], q, read_s, time.perf_counter() - started


def _pack_one(t: dict[str, Any]) -> tuple[str, Any, float, float]:
    """Pack one planned tensor; also returns the seconds spent reading it and quantizing it."""
    return _quantize(t, *_read(t))


def _quantize_rows(t: dict[str, Any], src: np.ndarray, lead: tuple[int, ...], read_s: float):
    started = time.perf_counter()
    q = quantize_native_rows(src, lead, _worker["signs"][t["signs_key"]], t["block"], _worker["levels"][t["codebook"]],
                             bits=t["bits"], group_size=t["group_size"], scale_method=_worker["scale_method"])
    return t["path"], q, read_s, time.perf_counter() - started


def _pack_reading_ahead(plan: list[dict[str, Any]]) -> Iterator[tuple[str, Any, float, float]]:
    """``_pack_one`` over the plan in this process, in order, reading each tensor (mlx, on this thread)
    while the one before quantizes on a helper thread (numpy and the native quantizer, which releases
    the GIL). The cores otherwise sit idle while a tensor is read. Two source tensors are held at most."""
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="quantize") as helper:
        for t in plan:
            w, read_s = _read(t)
            src = native_rows(w)
            if src is None:  # not readable in place by the native quantizer: quantize here, in order
                while pending:
                    yield pending.popleft().result()
                yield _quantize(t, w, read_s)
                continue
            pending.append(helper.submit(_quantize_rows, t, src, tuple(w.shape[:-1]), read_s))
            del w, src  # the helper's task holds the source now; freed when it is done
            while len(pending) > 1:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# --- main side


def native_threaded(rotated: Path) -> bool:
    """True when every tensor goes through the native quantizer (data-free and the extension usable),
    which runs on all cores in this process: no worker processes to start or results to pickle."""
    return not (rotated / "hessians.safetensors").exists() and native_kernels() is not None


def _worker_bytes(plan: list[dict[str, Any]], weights: dict[str, mx.array]) -> int:
    """Memory one worker needs: its largest source tensor, its packed output and the chunk temporaries."""
    largest = max(weights[f"{t['path']}.weight"].nbytes for t in plan)
    return 2 * largest + 24 * GPTQ_CHUNK_ELEMENTS + (256 << 20)


def run(ctx: StageContext) -> dict[str, Any]:
    recipe = ctx.recipe
    fetched, rotated = ctx.inputs["fetch"], ctx.inputs["rotate"]
    plan_file = json.loads((rotated / "plan.json").read_text())
    books = json.loads((ctx.inputs["codebook"] / "codebooks.json").read_text())
    plan = [t | {"codebook": codebook_name(recipe.codebook.kind, t["bits"])} for t in plan_file["tensors"]]
    config = read_config(fetched)
    model = build_model(config)
    weights = load_weights(fetched, model)  # lazy: nothing is read yet

    def kept(name: str) -> mx.array:  # an unquantized tensor, still lazy, in the dtype the plan counted
        arr = weights.pop(name)
        return arr.astype(kept_dtype(model, name, arr.dtype, recipe.kept_dtype))

    with safe_open(str(rotated / "signs.safetensors"), framework="numpy") as f:
        signs = {k: f.get_tensor(k) for k in f.keys()}

    if ctx.workers <= 0 and native_threaded(rotated):
        workers = 1  # the native quantizer spreads each tensor's rows over the cores itself
    else:
        workers = auto_workers(_worker_bytes(plan, weights), requested=ctx.workers)
    log.info("pack: %d tensors with %d worker process(es)", len(plan), workers)
    clock = (time.perf_counter(), time.process_time())  # wall and this process's CPU time (all its threads)
    writer = ShardWriter(ctx.out, expected_bytes=plan_file["summary"]["total_bytes"])
    planned = {f"{t['path']}.{part}" for t in plan for part in ("weight", "bias")}
    for name in sorted(set(weights) - planned):  # the kept tensors first: written while the first layers quantize
        writer.add(name, kept(name))
    seconds = {"read": 0.0, "quantize": 0.0}
    modules, report = {}, []
    by_path = {t["path"]: t for t in plan}
    levels = {name: b["levels"] for name, b in books.items()}
    initargs = (str(fetched), str(rotated), levels, recipe.codebook.scale_method, recipe.calibration.damp)
    if workers == 1 and native_threaded(rotated):
        _init_worker(*initargs)
        results = _pack_reading_ahead(plan)
    else:
        results = ordered_map(_pack_one, plan, workers=workers, initializer=_init_worker, initargs=initargs)
    with tqdm(total=sum(int(np.prod(t["shape"])) for t in plan), desc="pack", unit="w", unit_scale=True) as bar:
        for path, q, read_s, quantize_s in results:
            seconds["read"] += read_s
            seconds["quantize"] += quantize_s
            t = by_path[path]
            weights.pop(f"{path}.weight")
            writer.add(f"{path}.weight", q.packed)
            writer.add(f"{path}.scales", q.scales)
            writer.add(f"{path}.signs", signs[t["signs_key"]])
            if f"{path}.bias" in weights:
                writer.add(f"{path}.bias", kept(f"{path}.bias"))
            modules[path] = {"bits": t["bits"], "group_size": t["group_size"], "codebook": t["codebook"],
                             "block": t["block"], "rotation": t["signs_key"]}
            report.append({"path": path, "bits": t["bits"], "group_size": t["group_size"]} | q.stats)
            bar.update(int(np.prod(t["shape"])))
    files = writer.finish()
    if "cache_limit_before" in _worker:  # this process read the weights: give the cached buffers back
        mx.set_cache_limit(_worker.pop("cache_limit_before"))
        mx.clear_cache()
    seconds["waiting_for_writes"] = writer.waited
    cores_busy = (time.process_time() - clock[1]) / max(time.perf_counter() - clock[0], 1e-9)
    log.info("pack: %.1fs reading, %.1fs quantizing (summed over workers), %.1fs waiting for the shard writer; "
             "this process kept %.1f cores busy", seconds["read"], seconds["quantize"], seconds["waiting_for_writes"],
             cores_busy)
    ctx.hashes.update(writer.hashes)

    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    config["model_file"] = MODEL_FILE  # stock mlx-lm can load it too, with trust_remote_code
    (ctx.out / MODEL_FILE).write_text(MODEL_FILE_SOURCE)
    config["tqpipe"] = {
        "format_version": FORMAT_VERSION,
        "tqpipe_version": __version__,
        "codebooks": levels,
        "kept_dtype": recipe.kept_dtype,
        "modules": modules,
    }
    (ctx.out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (fetched / name).exists():
            link_or_copy(fetched / name, ctx.out / name)
    (ctx.out / "pack_report.json").write_text(json.dumps({"plan": plan_file["summary"], "tensors": report}, indent=1))
    errs = np.array([r["rel_mse"] for r in report])
    return {"tensors": len(report), "shards": len(files), "workers": workers,
            "mean_rel_mse": float(errs.mean()), "max_rel_mse": float(errs.max()),
            "calibration": recipe.calibration.mode, "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "cores_busy": round(cores_busy, 2)}
