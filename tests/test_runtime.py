"""Round trip: what pack writes, the runtime loads, and it computes the right thing."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import generate
from mlx_lm import load as load_unquantized
from safetensors.numpy import load_file

from tqpipe import runtime
from tqpipe.engine import build
from tqpipe.quant.packing import unpack_indices
from tqpipe.quant.rotation import rotate
from tqpipe.quant.scales import dequantize_groups
from tqpipe.recipe import Recipe
from tqpipe.runtime.layers import TQLinear


def packed_tiny(tiny_llama: Path, out: Path, attn_bits: int = 3, mlp_bits: int = 2) -> Path:
    recipe = Recipe.from_config({
        "name": "tiny", "model": {"kind": "local", "path": str(tiny_llama)},
        "rules": [{"pattern": r"self_attn\.(q|k|v|o)_proj$", "bits": attn_bits},
                  {"pattern": r"mlp\.(gate|up|down)_proj$", "bits": mlp_bits}],
    })
    build(recipe, outputs=out, stages=["fetch", "rotate", "codebook", "pack"])
    return out / "tiny" / "pack"


def test_packed_model_loads_with_quantized_layers(tiny_llama, tmp_path):
    folder = packed_tiny(tiny_llama, tmp_path)
    model, tokenizer = runtime.load(folder)
    layers = {p: m for p, m in model.named_modules() if isinstance(m, TQLinear)}
    assert len(layers) == 2 * 7
    q = layers["model.layers.0.self_attn.q_proj"]
    assert (q.bits, q.group_size, q.block) == (3, 32, 64)
    assert "bits=3" in repr(q)
    assert not any(type(m) is nn.Linear for _, m in model.named_modules())
    text = generate(model, tokenizer, "hello", max_tokens=5)
    assert isinstance(text, str) and len(tokenizer.encode(text)) > 0


def test_layer_output_equals_dequantize_then_matmul(tiny_llama, tmp_path):
    folder = packed_tiny(tiny_llama, tmp_path)
    model, _ = runtime.load(folder)
    stored = load_file(str(folder / "model.safetensors"))
    import json

    spec = json.loads((folder / "config.json").read_text())["tqpipe"]
    for path in ("model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj"):
        layer = dict(model.named_modules())[path]
        m = spec["modules"][path]
        levels = np.asarray(spec["codebooks"][m["codebook"]], dtype=np.float32)
        n = layer.input_dims
        idx = unpack_indices(stored[f"{path}.weight"], m["bits"], n)
        w_hat = dequantize_groups(idx, stored[f"{path}.scales"], levels, group_size=m["group_size"])
        x = np.random.default_rng(0).standard_normal((3, n)).astype(np.float32)
        x_rot = np.array(rotate(mx.array(x), mx.array(stored[f"{path}.signs"]), m["block"]))
        np.testing.assert_allclose(np.array(layer(mx.array(x))), x_rot @ w_hat.T, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.array(layer.to_dense()(mx.array(x))), x_rot @ w_hat.T, rtol=1e-4, atol=1e-4)


def test_modules_reading_one_input_rotate_it_once(tiny_llama, tmp_path):
    """q/k/v (and gate/up) share one rotation; the logits equal those of separate rotations."""
    folder = packed_tiny(tiny_llama, tmp_path)
    model, tok = runtime.load(folder, dtype=mx.float32)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.rotation is attn.k_proj.rotation is attn.v_proj.rotation
    assert mlp.gate_proj.rotation is mlp.up_proj.rotation is not attn.q_proj.rotation
    assert attn.o_proj.rotation.consumers == 1 and attn.q_proj.rotation.consumers == 3
    assert attn.q_proj.scales.dtype == mx.float16  # the kernels read the stored scales; dtype= casts the rest
    ids = mx.array(tok.encode("The quick brown fox"))[None]
    shared = model(ids)
    assert attn.q_proj.rotation._x is None  # every consumer read the memo, so it let the activation go
    for _, m in model.named_modules():
        if isinstance(m, TQLinear):
            m.rotation = None
    np.testing.assert_array_equal(np.array(shared), np.array(model(ids)))


def test_8bit_model_reproduces_the_unquantized_logits(tiny_llama, tmp_path):
    """At 8 bits the quantization error is tiny, so any rotation mistake would show."""
    folder = packed_tiny(tiny_llama, tmp_path, attn_bits=8, mlp_bits=8)
    quant, tok = runtime.load(folder)
    base, _ = load_unquantized(str(tiny_llama))
    ids = mx.array(tok.encode("The quick brown fox jumps over the lazy dog."))[None]
    lq, lb = np.array(quant(ids)), np.array(base(ids))
    assert np.abs(lq - lb).max() < 0.02 * np.abs(lb).max()


def test_loader_rejects_unknown_format_version(tiny_llama, tmp_path):
    import json
    import shutil

    folder = packed_tiny(tiny_llama, tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["tqpipe"]["format_version"] = 999
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format version 999"):
        runtime.load(bad)


@pytest.mark.parametrize("tokens, k", [(1, 2), (6, 3)])  # fewer selections than experts, and more
def test_expert_stack_layer_equals_dense_gather(tokens, k):
    from tqpipe.quant.codebook import lloyd_max_gaussian
    from tqpipe.quant.quantize import quantize_tensor
    from tqpipe.runtime.layers import TQSwitchLinear

    experts, out, n, bits = 8, 24, 64, 3
    w = mx.random.normal((experts, out, n), key=mx.random.key(1))
    signs = np.where(np.random.default_rng(0).random(n) < 0.5, -1, 1).astype(np.int8)
    levels = lloyd_max_gaussian(bits)
    q = quantize_tensor(w, signs, n, levels, bits=bits, group_size=32, scale_method="mse")
    layer = TQSwitchLinear(n, out, experts, bits=bits, group_size=32, block=n, levels=[float(v) for v in levels])
    layer.weight, layer.scales, layer.signs = mx.array(q.packed), mx.array(q.scales), mx.array(signs)
    x = mx.random.normal((tokens, 1, 1, 1, n), key=mx.random.key(2))  # as mlx-lm's SwitchMLP passes it
    idx = mx.random.randint(0, experts, (tokens, 1, k), key=mx.random.key(3)).astype(mx.uint32)
    dense = layer.dequantized_weight()  # [experts, out, n] in the rotated basis
    x_rot = rotate(x, layer.signs, n)
    expect = np.stack([[np.array(x_rot[t, 0, 0, 0] @ dense[int(e)].T) for e in np.array(idx[t, 0])] for t in range(tokens)])
    got = np.array(layer(x, idx))  # [tokens, 1, k, 1, out]
    np.testing.assert_allclose(got.reshape(tokens, k, out), expect, rtol=1e-4, atol=1e-4)
    assert "num_experts=8" in repr(layer)


def test_min_tokens_keeps_eos_out_until_n_tokens():
    from tqpipe.generate import min_tokens_processor

    proc = min_tokens_processor({5}, prompt_len=3, min_tokens=2)
    logits = mx.zeros((1, 8))
    logits[0, 5] = 10.0
    assert int(mx.argmax(proc(mx.array([1, 2, 3, 4]), mx.array(logits)))) != 5  # 1 generated < 2
    assert int(mx.argmax(proc(mx.array([1, 2, 3, 4, 6]), mx.array(logits)))) == 5  # 2 generated: allowed


def test_generate_cli_streams_and_reports_speed(tiny_llama, tmp_path, capsys):
    from tqpipe.generate import main

    folder = packed_tiny(tiny_llama, tmp_path)
    main(["--model", str(folder), "--prompt", "hello", "--max-tokens", "6", "--min-tokens", "6", "--temp", "0.8",
          "--top-p", "0.9", "--rep-penalty", "1.1", "--rep-ctx", "8", "--seed", "1"])
    out, err = capsys.readouterr()
    assert "decode: 6 tokens" in err and "tokens/s" in err and "peak memory" in err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "nowhere"), "--prompt", "x"])


def test_stock_mlx_lm_loads_the_packed_folder_with_trust_remote_code(tiny_llama, tmp_path):
    """mlx-lm's own load (model_file + trust_remote_code) builds the same quantized model."""
    import json

    from mlx_lm import load as mlx_lm_load

    folder = packed_tiny(tiny_llama, tmp_path)
    assert json.loads((folder / "config.json").read_text())["model_file"] == "tqpipe_model.py"
    with pytest.raises(ValueError, match="trust_remote_code"):
        mlx_lm_load(str(folder))
    theirs, tok = mlx_lm_load(str(folder), trust_remote_code=True)
    ours, _ = runtime.load(folder)
    assert any(isinstance(m, TQLinear) for _, m in theirs.named_modules())
    ids = mx.array(tok.encode("The quick brown fox"))[None]
    assert mx.array_equal(theirs(ids), ours(ids))
    assert generate(theirs, tok, "hello", max_tokens=5) == generate(ours, tok, "hello", max_tokens=5)


def test_server_answers_a_chat_completion_over_http(tiny_llama, tmp_path):
    """tqpipe-serve (mlx-lm's server) on 127.0.0.1: one chat completion, then it is stopped."""
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    folder = packed_tiny(tiny_llama, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tqpipe.serve", "--model", str(folder), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/v1/models", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                time.sleep(0.5)
        body = json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
        choice = reply["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert 1 <= reply["usage"]["completion_tokens"] <= 5 and reply["usage"]["prompt_tokens"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_loaded_model_holds_no_more_than_its_packed_bytes(tiny_llama, tmp_path):
    """No full-precision copy survives loading: resident bytes stay within 1.05x of the files."""
    import gc

    folder = packed_tiny(tiny_llama, tmp_path)
    packed = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    model, _ = runtime.load(folder)
    mx.eval(model.parameters())
    assert mx.get_active_memory() - before <= 1.05 * packed
