"""Reference logits: the compact form, its statistics against the exact ones, the cache and import."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tqpipe.eval.reference import (
    Reference,
    cached_reference,
    compute_reference,
    import_reference,
    reference_key,
    stats_against_reference,
    token_stats_compact,
    tokenizer_fingerprint,
)
from tqpipe.eval.stats import token_stats

ROOT = Path(__file__).resolve().parent.parent


class LogitsModel:
    """A stand-in model: fixed ``[N, context, V]`` logits, looked up by window."""

    def __init__(self, windows: mx.array, logits: mx.array):
        self.rows = {tuple(np.array(w).tolist()): l for w, l in zip(windows, logits)}

    def __call__(self, x: mx.array) -> mx.array:
        return self.rows[tuple(np.array(x[0]).tolist())][None]


def random_case(n=3, context=32, vocab=500, scale=4.0, noise=0.3, seed=0):
    """LM-like peaked logits (heavy-tailed scores) and a perturbed 'quantized' copy."""
    rng = np.random.default_rng(seed)
    windows = mx.array(rng.integers(0, vocab, size=(n, context)))
    base = scale * rng.standard_t(4, size=(n, context, vocab)).astype(np.float32)
    quant = base + noise * rng.standard_normal(base.shape).astype(np.float32)
    return windows, mx.array(base), mx.array(quant)


def exact_and_compact(ref, windows, base, quant, context):
    half = context // 2
    exact, compact = [], []
    for i, w in enumerate(windows):
        exact.append(token_stats(base[i, half:-1], quant[i, half:-1], w[half + 1:]))
        compact.append(token_stats_compact(ref, i, quant[i, half:-1], w[half + 1:]))
    cat = lambda rows: {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    return cat(exact), cat(compact)


def assert_close_to_exact(exact, compact, rel=0.01):
    for k in ("nll_base", "nll_quant", "top1_agree"):
        np.testing.assert_array_equal(compact[k], exact[k], err_msg=k)
    for k, nll in (("p_base", "nll_base"), ("p_quant", "nll_quant")):
        np.testing.assert_allclose(compact[k], exact.get(k, np.exp(-exact[nll])), rtol=1e-5, err_msg=k)
    e, c = exact["kld"].mean(), compact["kld"].mean()
    assert abs(e - c) / e < rel, (e, c)
    assert np.all(compact["kld"] <= exact["kld"] + 1e-5)  # the merged tail is a lower bound


def test_save_load_round_trip(tmp_path):
    windows, base, _ = random_case()
    ref = compute_reference(LogitsModel(windows, base), windows, context=32, k=32, progress=False,
                            meta={"text": "t", "tokens": 96, "model": "m", "tokenizer": "tk"})
    assert ref.top_ids.shape == (3, 15, 32) and ref.top_ids.dtype == np.int32
    assert ref.lse_rest.shape == ref.target_logp.shape == ref.argmax.shape == ref.targets.shape == (3, 15)
    assert np.all(np.diff(ref.top_logp, axis=-1) <= 0)  # most likely first
    path = ref.save(tmp_path / "ref.safetensors")
    back = Reference.load(path)
    for k, a in ref.arrays().items():
        np.testing.assert_array_equal(getattr(back, k), a)
        assert getattr(back, k).dtype == a.dtype
    assert back.meta["context"] == "32" and back.meta["k"] == "32" and back.meta["text"] == "t"
    assert back.meta["format"] == "tqpipe.reference" and back.meta["windows"] == "3"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_compact_stats_match_exact_random_logits():
    windows, base, quant = random_case()
    ref = compute_reference(LogitsModel(windows, base), windows, context=32, k=32, progress=False)
    exact, compact = exact_and_compact(ref, windows, base, quant, 32)
    assert_close_to_exact(exact, compact)
    whole = stats_against_reference(ref, [quant[i, 16:-1] for i in range(3)])
    np.testing.assert_array_equal(whole["kld"], compact["kld"])


def test_compact_stats_exact_when_k_covers_vocab():
    windows, base, quant = random_case(vocab=40, scale=1.0)
    ref = compute_reference(LogitsModel(windows, base), windows, context=32, k=64, progress=False)
    assert ref.top_ids.shape[-1] == 40 and np.all(np.isneginf(ref.lse_rest))
    exact, compact = exact_and_compact(ref, windows, base, quant, 32)
    np.testing.assert_allclose(compact["kld"], exact["kld"], rtol=1e-4, atol=1e-6)


def test_compact_stats_match_exact_tiny_llama(tiny_llama):
    from mlx.utils import tree_map_with_path
    from mlx_lm import load

    base_model, tokenizer = load(str(tiny_llama))
    quant_model, _ = load(str(tiny_llama))
    for m in (base_model, quant_model):
        m.set_dtype(mx.float32)
        m.model.norm.weight = mx.full(m.model.norm.weight.shape, 6.0)  # a random init is near uniform: sharpen it

    def q4(path, w):  # round-to-nearest 4-bit weights: a real quantization error
        return mx.dequantize(*mx.quantize(w, group_size=32, bits=4), group_size=32, bits=4) \
            if w.ndim == 2 and "norm" not in path else w

    quant_model.update(tree_map_with_path(q4, quant_model.parameters()))
    context = 64
    windows = mx.array(np.random.default_rng(0).integers(0, 256, size=(2, context)))
    ref = compute_reference(base_model, windows, context=context, k=32, progress=False,
                            meta={"tokenizer": tokenizer_fingerprint(tokenizer)})
    per_window = lambda m: mx.concatenate([m(w[None]) for w in windows])
    exact, compact = exact_and_compact(ref, windows, per_window(base_model), per_window(quant_model), context)
    assert exact["kld"].mean() > 1e-3  # the perturbation is visible
    assert_close_to_exact(exact, compact)
    assert len(ref.meta["tokenizer"]) == 64


def test_reference_key_depends_on_every_input():
    args = ("m", "pydoc_topics", 4096, 512, 128, "tk")
    keys = {reference_key(*args)}
    for i, other in enumerate(("m2", "other", 2048, 256, 64, "tk2")):
        keys.add(reference_key(*args[:i], other, *args[i + 1:]))
    assert len(keys) == 7 and reference_key(*args) == reference_key(*args)


def test_cache_computes_once_and_reuses(tmp_path, caplog):
    windows, base, _ = random_case()
    calls = []

    def compute():
        calls.append(1)
        return compute_reference(LogitsModel(windows, base), windows, context=32, k=32, progress=False)

    key = reference_key("m", "t", 96, 32, 32, "tk")
    (tmp_path / f".{key}.safetensors.abc123.tmp").write_bytes(b"half-written")  # a crashed writer's leftover
    with caplog.at_level(logging.INFO, logger="tqpipe.eval.reference"):
        first, cached1 = cached_reference(tmp_path, key, compute)
        second, cached2 = cached_reference(tmp_path, key, compute)
    assert (cached1, cached2) == (False, True) and len(calls) == 1
    for k, a in first.arrays().items():
        np.testing.assert_array_equal(getattr(second, k), a)
    text = caplog.text
    assert "reference logits: computed" in text and f"reference logits: reused {tmp_path / key}" in text


WORKER = """
import sys, time, hashlib
from pathlib import Path
import numpy as np
from tqpipe.eval.reference import Reference, cached_reference

cache, counter = Path(sys.argv[1]), Path(sys.argv[2])

def compute():
    with open(counter, "a") as f:
        f.write("computed\\n")
    time.sleep(1.0)
    rng = np.random.default_rng(0)
    return Reference(top_ids=rng.integers(0, 99, (2, 3, 4)).astype(np.int32),
                     top_logp=rng.standard_normal((2, 3, 4)).astype(np.float32),
                     lse_rest=rng.standard_normal((2, 3)).astype(np.float32),
                     target_logp=rng.standard_normal((2, 3)).astype(np.float32),
                     argmax=np.zeros((2, 3), np.int32), targets=np.ones((2, 3), np.int32), meta={"k": "4"})

ref, cached = cached_reference(cache, "samekey", compute)
digest = hashlib.sha256(b"".join(a.tobytes() for a in ref.arrays().values())).hexdigest()
print(cached, digest)
"""


def test_concurrent_processes_compute_once(tmp_path):
    script, counter = tmp_path / "worker.py", tmp_path / "counter.txt"
    script.write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(counter)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert counter.read_text().splitlines() == ["computed"]
    results = [out.split() for out, _ in outs]
    assert sorted(r[0] for r in results) == ["False", "True"]
    assert results[0][1] == results[1][1]


def test_import_checks_metadata(tmp_path):
    windows, base, _ = random_case()
    meta = {"model": "m", "text": "t", "tokens": 96, "context": 32, "k": 32, "tokenizer": "tk"}
    ref = compute_reference(LogitsModel(windows, base), windows, context=32, k=32, progress=False,
                            meta={k: v for k, v in meta.items() if k not in ("context", "k")})
    src = ref.save(tmp_path / "elsewhere" / "ref.safetensors")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"context='32', but context='64' is asked.*recompute"):
        import_reference(src, cache, {**meta, "context": 64})
    with pytest.raises(ValueError, match="tokenizer='tk', but tokenizer='other'"):
        import_reference(src, cache, {**meta, "tokenizer": "other"})
    assert not cache.exists() or not any(cache.iterdir())
    dst = import_reference(src, cache, meta)
    assert dst == cache / f"{reference_key('m', 't', 96, 32, 32, 'tk')}.safetensors"
    got, cached = cached_reference(cache, dst.stem, lambda: pytest.fail("should reuse the import"))
    assert cached
    np.testing.assert_array_equal(got.top_logp, ref.top_logp)
