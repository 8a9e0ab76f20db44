"""Streaming pack: row chunks, expert stacks, shards and worker processes change no byte."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

from tqpipe.engine import build
from tqpipe.manifest import sha256_file
from tqpipe.parallel import ordered_map
from tqpipe.quant.codebook import lloyd_max_gaussian
from tqpipe.quant.packing import pack_indices
from tqpipe.quant.quantize import quantize_tensor, quantize_weight
from tqpipe.quant.rotation import random_signs, rotate
from tqpipe.quant.scales import dequantize_groups
from tqpipe.recipe import Recipe
from tqpipe.shards import ShardWriter


def _inputs(shape, bits=2, seed=0):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return mx.array(w), random_signs(shape[-1], seed=0, key="t"), lloyd_max_gaussian(bits)


def test_row_chunks_give_the_same_bytes_as_one_pass():
    w, signs, levels = _inputs((96, 128))
    one = quantize_tensor(w, signs, 128, levels, bits=2, group_size=32, scale_method="mse")
    chunked = quantize_tensor(w, signs, 128, levels, bits=2, group_size=32, scale_method="mse", chunk_elements=1000)
    np.testing.assert_array_equal(one.packed, chunked.packed)
    np.testing.assert_array_equal(one.scales, chunked.scales)
    assert one.stats["rel_mse"] == pytest.approx(chunked.stats["rel_mse"], rel=1e-6)


def test_quantize_tensor_matches_rotate_then_quantize_and_its_error_stats():
    w, signs, levels = _inputs((40, 64), bits=3)
    q = quantize_tensor(w, signs, 64, levels, bits=3, group_size=32, scale_method="mse")
    w_rot = np.array(rotate(w, mx.array(signs), 64))
    idx, scales = quantize_weight(w_rot, levels, group_size=32, scale_method="mse")
    np.testing.assert_array_equal(q.packed, pack_indices(idx, 3))
    np.testing.assert_array_equal(q.scales, scales)
    w_hat = dequantize_groups(idx, scales, levels, group_size=32)
    assert q.stats["rel_mse"] == pytest.approx(np.sum((w_hat - w_rot) ** 2) / np.sum(w_rot**2), rel=1e-5)
    assert q.stats["projection"] == pytest.approx(np.sum(w_hat * w_rot) / np.sum(w_rot**2), rel=1e-5)


def test_expert_stack_is_quantized_expert_by_expert():
    w, signs, levels = _inputs((4, 24, 64))
    stack = quantize_tensor(w, signs, 64, levels, bits=2, group_size=32, scale_method="rms")
    assert stack.packed.shape == (4, 24, 4) and stack.scales.shape == (4, 24, 2)
    for e in range(4):
        one = quantize_tensor(w[e], signs, 64, levels, bits=2, group_size=32, scale_method="rms")
        np.testing.assert_array_equal(stack.packed[e], one.packed)


def test_shard_writer_splits_and_indexes(tmp_path):
    writer = ShardWriter(tmp_path, shard_bytes=5000)
    arrays = {f"t{i}": mx.arange(i * 300, dtype=mx.float32) for i in range(1, 8)}
    for k, v in arrays.items():
        writer.add(k, v)
    files = writer.finish()
    assert len(files) > 1 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(arrays)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in arrays.values())
    back = {}
    for f in files:
        back.update(mx.load(str(tmp_path / f)))
    for k, v in arrays.items():
        assert mx.array_equal(back[k], v)
    assert writer.hashes == {f: sha256_file(tmp_path / f) for f in files}  # hashed by the writer thread
    with pytest.raises(ValueError, match="twice"):
        w2 = ShardWriter(tmp_path / "x")
        w2.add("a", mx.zeros(2))
        w2.add("a", mx.zeros(2))


def test_shard_writer_halves_the_last_shards_when_told_the_total(tmp_path):
    """The tail written after the last tensor is small, and the same sizes always give the same files."""
    arrays = {f"t{i:02d}": mx.full((100,), i, dtype=mx.float32) for i in range(20)}  # 400 bytes each, 8000 in all

    def write(folder, **kw):
        folder.mkdir()
        writer = ShardWriter(folder, shard_bytes=4000, min_shard_bytes=500, **kw)
        for k, v in arrays.items():
            writer.add(k, v)
        files = writer.finish()
        return [(folder / f).stat().st_size for f in files], writer.hashes

    plain, _ = write(tmp_path / "plain")
    halved, hashes = write(tmp_path / "a", expected_bytes=8000)
    again, hashes_again = write(tmp_path / "b", expected_bytes=8000)
    header = plain[0] - 4000
    assert [s - header for s in plain] == [4000, 4000]
    assert len(halved) == 4 and max(halved) - min(halved) > 2000 and halved == sorted(halved, reverse=True)
    assert halved[-1] - 200 < 1000  # about 800 bytes of data (two tensors) left for the end
    assert hashes == hashes_again and halved == again
    back = {}
    for f in sorted((tmp_path / "a").glob("*.safetensors")):
        back.update(mx.load(str(f)))
    assert all(mx.array_equal(back[k], v) for k, v in arrays.items())


def test_shard_writer_keeps_every_dtype_and_lazy_tensors(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"bf16": mx.array(rng.standard_normal((3, 5)), dtype=mx.bfloat16),
              "lazy": mx.arange(12, dtype=mx.float32).reshape(3, 4) * 2,  # computed when its shard is written
              "u32": rng.integers(0, 2**32, (4, 3), dtype=np.uint32), "f16": rng.standard_normal(7).astype(np.float16),
              "i8": np.array([-1, 1, 1], dtype=np.int8)}
    writer = ShardWriter(tmp_path)
    for k, v in arrays.items():
        writer.add(k, v)
    assert writer.finish() == ["model.safetensors"]
    back = mx.load(str(tmp_path / "model.safetensors"))
    for k, v in arrays.items():
        want = v if isinstance(v, mx.array) else mx.array(v)
        assert back[k].dtype == want.dtype and mx.array_equal(back[k], want), k


def test_ordered_map_keeps_order_in_worker_processes():
    tasks = list(range(12))
    assert list(ordered_map(math.factorial, tasks, workers=2)) == [math.factorial(t) for t in tasks]
    assert list(ordered_map(math.factorial, tasks, workers=1)) == [math.factorial(t) for t in tasks]


def test_pack_is_byte_identical_with_one_or_two_workers(tiny_llama, tmp_path):
    recipe = Recipe.from_config({
        "name": "tiny", "model": {"kind": "local", "path": str(tiny_llama)},
        "rules": [{"pattern": r"self_attn\.(q|k|v|o)_proj$", "bits": 3},
                  {"pattern": r"mlp\.(gate|up|down)_proj$", "bits": 2}],
        "calibration": {"mode": "none"},
    })
    stages = ["fetch", "rotate", "codebook", "pack"]
    tensors = []
    for workers in (1, 2):
        build(recipe, outputs=tmp_path / str(workers), stages=stages, workers=workers)
        with safe_open(str(tmp_path / str(workers) / "tiny" / "pack" / "model.safetensors"), framework="numpy") as f:
            tensors.append({k: f.get_tensor(k) for k in f.keys()})
    assert tensors[0].keys() == tensors[1].keys()
    for k in tensors[0]:
        np.testing.assert_array_equal(tensors[0][k], tensors[1][k])
