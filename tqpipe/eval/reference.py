"""Reference (unquantized-model) logits, computed once and kept in a compact form.

As llama.cpp's ``--kl-divergence-base``, the base model's predictions on the
validation windows are computed once per (model, text, tokens, context, k,
tokenizer) and reused by every variant of a sweep; a file computed on another
machine can be imported into the cache.

Format: one safetensors file. For ``N`` windows of ``context`` tokens the scored
positions are ``half .. context-2`` (``half = context // 2``), ``T = context-1-half``
per window, each predicting the next token. Arrays:

- ``top_ids``     int32   ``[N, T, k]``  the base model's k most likely tokens, most likely first
- ``top_logp``    float32 ``[N, T, k]``  their log-probabilities
- ``lse_rest``    float32 ``[N, T]``     log of the total probability of every other token (-inf if none)
- ``target_logp`` float32 ``[N, T]``     log-probability of the true next token
- ``argmax``      int32   ``[N, T]``     the base model's top-1 token
- ``targets``     int32   ``[N, T]``     the true next tokens (a check that the windows are the same)

Metadata (strings): ``format`` (``tqpipe.reference``), ``version``, ``text``, ``tokens``,
``context``, ``k``, ``model`` and ``tokenizer`` (fingerprints), ``windows``.

KL divergence from the compact form merges the tail into one bin,
``Σ_top p_i (log p_i − log q_i) + p_rest (log p_rest − log q_rest)``: a lower bound
of the exact KL (log-sum inequality), close to it when the top k hold most of the mass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from tqpipe.cache import cached_entry


log = logging.getLogger(__name__)

FORMAT, VERSION = "tqpipe.reference", "1"
ARRAYS = ("top_ids", "top_logp", "lse_rest", "target_logp", "argmax", "targets")
CHECKED = ("text", "tokens", "context", "k", "tokenizer")  # what an imported file must match


@dataclass
class Reference:
    """The compact reference: the arrays of the module docstring and string metadata."""

    top_ids: np.ndarray
    top_logp: np.ndarray
    lse_rest: np.ndarray
    target_logp: np.ndarray
    argmax: np.ndarray
    targets: np.ndarray
    meta: dict[str, str] = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAYS}

    def save(self, path: Path) -> Path:
        """Write atomically: a temporary file in the same folder, then ``os.replace``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: np.ascontiguousarray(v) for k, v in self.arrays().items()}, tmp,
                      metadata={"format": FORMAT, "version": VERSION, **{k: str(v) for k, v in self.meta.items()}})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: Path) -> Reference:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            arrays = {k: f.get_tensor(k) for k in ARRAYS}
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{path} is not a {FORMAT} v{VERSION} file (format={meta.get('format')!r}, "
                             f"version={meta.get('version')!r})")
        return cls(**arrays, meta=meta)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's sorted vocabulary items (token → id)."""
    vocab = tokenizer.vocab if hasattr(tokenizer, "vocab") else tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()


def reference_key(model_digest: str, text: str, tokens: int, context: int, k: int, tokenizer_digest: str) -> str:
    """The cache key: sha256 of the JSON of every input that determines the reference."""
    obj = {"format": FORMAT, "version": VERSION, "model": model_digest, "text": text, "tokens": int(tokens),
           "context": int(context), "k": int(k), "tokenizer": tokenizer_digest}
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _log_softmax(logits: mx.array) -> mx.array:
    x = logits.astype(mx.float32)  # the same arithmetic as stats.token_stats, so nll and top-1 agree exactly
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _lse_outside(lp: mx.array, ids: mx.array) -> mx.array:
    """Log of the total probability of the tokens not in ``ids``, per row."""
    return mx.logsumexp(mx.put_along_axis(lp, ids, mx.array(-np.inf, mx.float32), axis=-1), axis=-1)


def compute_reference(model: Callable[[mx.array], mx.array], windows: mx.array, *, context: int, k: int = 2048,
                      progress: bool = True, meta: dict[str, Any] | None = None) -> Reference:
    """Run the base model over ``[N, context]`` windows and keep the compact form of its scored positions.

    ``meta`` should carry ``text``, ``tokens``, ``model`` and ``tokenizer`` (fingerprints);
    ``context``, ``k`` and ``windows`` are added.
    """
    if windows.shape[1] != context:
        raise ValueError(f"windows are {windows.shape[1]} tokens, context is {context}")
    half, parts = context // 2, {name: [] for name in ARRAYS}
    for window in tqdm(windows, desc="reference", unit="window", disable=not progress):
        lp = _log_softmax(model(window[None])[0, half:-1])
        kk = min(k, lp.shape[-1])
        ids = mx.argpartition(-lp, kth=kk - 1, axis=-1)[:, :kk]
        order = mx.argsort(-mx.take_along_axis(lp, ids, axis=-1), axis=-1)
        ids = mx.take_along_axis(ids, order, axis=-1).astype(mx.int32)
        targets = window[half + 1:].astype(mx.int32)
        row = {"top_ids": ids, "top_logp": mx.take_along_axis(lp, ids, axis=-1), "lse_rest": _lse_outside(lp, ids),
               "target_logp": mx.take_along_axis(lp, targets[:, None], axis=-1)[:, 0],
               "argmax": mx.argmax(lp, axis=-1).astype(mx.int32), "targets": targets}
        mx.eval(row)
        for name, a in row.items():
            parts[name].append(np.array(a))
    meta = {**(meta or {}), "context": context, "k": k, "windows": windows.shape[0]}
    return Reference(**{n: np.stack(a) for n, a in parts.items()}, meta={m: str(v) for m, v in meta.items()})


def token_stats_compact(ref: Reference, window_index: int, quant_logits: mx.array,
                        targets: mx.array | np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``stats.token_stats`` against the reference for one window's ``[T, V]`` scored logits.

    Returns ``kld`` (tail merged into one bin), ``nll_base``, ``nll_quant``, ``top1_agree``,
    and ``p_base``/``p_quant``: the probability of the true next token under each model.
    """
    i = window_index
    if targets is not None and not np.array_equal(np.asarray(targets), ref.targets[i]):
        raise ValueError(f"window {i}: the targets differ from those the reference was computed on")
    lq = _log_softmax(mx.array(quant_logits))
    ids, lp_top = mx.array(ref.top_ids[i]), mx.array(ref.top_logp[i])
    lp_rest, lq_rest = mx.array(ref.lse_rest[i]), _lse_outside(lq, ids)
    rest = mx.exp(lp_rest) * (lp_rest - lq_rest)
    kld = mx.sum(mx.exp(lp_top) * (lp_top - mx.take_along_axis(lq, ids, axis=-1)), axis=-1) \
        + mx.where(mx.isinf(lp_rest), 0.0, rest)
    lq_t = mx.take_along_axis(lq, mx.array(ref.targets[i])[:, None], axis=-1)[:, 0]
    lp_t = mx.array(ref.target_logp[i])
    out = {"kld": kld, "nll_base": -lp_t, "nll_quant": -lq_t,
           "top1_agree": mx.array(ref.argmax[i]) == mx.argmax(lq, axis=-1).astype(mx.int32),
           "p_base": mx.exp(lp_t), "p_quant": mx.exp(lq_t)}
    return {k: np.array(v) for k, v in out.items()}


def stats_against_reference(ref: Reference, quant_logits: Iterable[mx.array]) -> dict[str, np.ndarray]:
    """``token_stats_compact`` over every window (``quant_logits``: one ``[T, V]`` array per window), concatenated."""
    per = [token_stats_compact(ref, i, q) for i, q in enumerate(quant_logits)]
    return {k: np.concatenate([p[k] for p in per]) for k in per[0]}


def cached_reference(cache_dir: Path, key: str, compute: Callable[[], Reference], *,
                     log: logging.Logger = log) -> tuple[Reference, bool]:
    """``(reference, was_cached)`` for ``key``: load ``<cache_dir>/<key>.safetensors`` or compute and store it.

    Safe across processes: an exclusive lock on ``<key>.lock``, a second look once it is held,
    and an atomic write, so that a half-written file is never taken for a complete one.
    """
    path = Path(cache_dir) / f"{key}.safetensors"
    made: list[Reference] = []

    def make(tmp: Path) -> None:
        made.append(compute())
        made[0].save(tmp)

    if cached_entry(path, make):
        log.info("reference logits: reused %s", path)
        return Reference.load(path), True
    log.info("reference logits: computed %s windows x %s positions, k=%s -> %s", *made[0].top_ids.shape, path)
    return made[0], False


def import_reference(src: Path, cache_dir: Path, key_meta: dict[str, Any]) -> Path:
    """Copy a reference computed elsewhere into the cache after checking that it fits ``key_meta``.

    ``key_meta`` holds ``model``, ``text``, ``tokens``, ``context``, ``k`` and ``tokenizer``
    (the arguments of ``reference_key``); every field of ``CHECKED`` must match the file's metadata.
    """
    ref = Reference.load(src)
    for name in CHECKED:
        have, want = ref.meta.get(name), str(key_meta[name])
        if have != want:
            raise ValueError(f"reference {src} was computed with {name}={have!r}, but {name}={want!r} is asked; "
                             f"recompute it with {name}={want!r} or set {name}={have!r} to use this file")
    if ref.meta.get("model") != str(key_meta["model"]):
        log.warning("reference %s: model fingerprint %s differs from %s; importing anyway",
                    src, ref.meta.get("model"), key_meta["model"])
    key = reference_key(key_meta["model"], key_meta["text"], key_meta["tokens"], key_meta["context"],
                        key_meta["k"], key_meta["tokenizer"])
    dst = Path(cache_dir) / f"{key}.safetensors"
    dst.parent.mkdir(parents=True, exist_ok=True)
    if cached_entry(dst, lambda tmp: shutil.copyfile(src, tmp)):
        log.info("reference logits: %s is already in the cache as %s", src, dst)
    else:
        log.info("reference logits: imported %s -> %s", src, dst)
    return dst
