"""Stage bookkeeping: manifests, skipping, forcing, subsets and failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tqpipe.cache import remembered_sha256
from tqpipe.engine import build
from tqpipe.manifest import sha256_file
from tqpipe.recipe import Recipe, RecipeError
from tqpipe.stages import STAGES

FRONT = ["fetch", "rotate", "codebook", "pack"]


def tiny_recipe(path: Path, **extra) -> Recipe:
    return Recipe.from_config({
        "name": "tiny", "model": {"kind": "local", "path": str(path)},
        "rules": [{"pattern": r"self_attn\.", "bits": 3}, {"pattern": r"mlp\.", "bits": 2}], **extra,
    })


def test_every_stage_shares_one_interface():
    for name, mod in STAGES.items():
        assert callable(mod.run) and callable(mod.settings), name
        assert all(n in STAGES and list(STAGES).index(n) < list(STAGES).index(name) for n in mod.NEEDS)


def test_manifest_records_inputs_outputs_and_versions(tiny_llama, tmp_path):
    build(tiny_recipe(tiny_llama), outputs=tmp_path, stages=FRONT)
    m = json.loads((tmp_path / "tiny" / "pack" / "manifest.json").read_text())
    fetch = json.loads((tmp_path / "tiny" / "fetch" / "manifest.json").read_text())
    assert m["inputs"]["fetch"] == fetch["digest"]
    assert "model.safetensors" in m["outputs"] and len(m["outputs"]["model.safetensors"]) == 64
    assert {"mlx", "mlx-lm", "numpy", "python"} <= set(m["versions"])
    for stage in ("fetch", "pack"):  # digests the stage handed over (fetch's cache, pack's writer) are the files'
        folder = tmp_path / "tiny" / stage
        outputs = json.loads((folder / "manifest.json").read_text())["outputs"]
        assert outputs == {name: sha256_file(folder / name) for name in outputs}


def test_source_files_are_hashed_once_and_again_when_they_change(tmp_path, monkeypatch):
    import tqpipe.manifest

    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"one"), b.write_bytes(b"two")
    first = remembered_sha256([a, b], tmp_path / "cache")
    assert first == {a: sha256_file(a), b: sha256_file(b)}
    link = tmp_path / "link.bin"
    link.hardlink_to(a)
    monkeypatch.setattr(tqpipe.manifest, "sha256_file", lambda p: pytest.fail(f"{p} was read again"))
    assert remembered_sha256([b, link], tmp_path / "cache") == {b: first[b], link: first[a]}
    monkeypatch.undo()
    a.write_bytes(b"changed")
    assert remembered_sha256([a], tmp_path / "cache")[a] == sha256_file(a) != first[a]


def test_rerun_skips_and_force_rebuilds(tiny_llama, tmp_path):
    r = tiny_recipe(tiny_llama)
    assert {o.status for o in build(r, outputs=tmp_path, stages=FRONT)} == {"built"}
    assert {o.status for o in build(r, outputs=tmp_path, stages=FRONT)} == {"skipped"}
    statuses = {o.stage: o.status for o in build(r, outputs=tmp_path, stages=FRONT, force=["pack"])}
    assert statuses == {"fetch": "skipped", "rotate": "skipped", "codebook": "skipped", "pack": "built"}


def test_changed_setting_rebuilds_only_what_depends_on_it(tiny_llama, tmp_path):
    build(tiny_recipe(tiny_llama), outputs=tmp_path, stages=FRONT)
    changed = tiny_recipe(tiny_llama, codebook={"scale_method": "rms"})
    statuses = {o.stage: o.status for o in build(changed, outputs=tmp_path, stages=FRONT)}
    assert statuses == {"fetch": "skipped", "rotate": "skipped", "codebook": "skipped", "pack": "built"}
    reseeded = tiny_recipe(tiny_llama, rotation={"seed": 1}, codebook={"scale_method": "rms"})
    statuses = {o.stage: o.status for o in build(reseeded, outputs=tmp_path, stages=FRONT)}
    assert statuses == {"fetch": "skipped", "rotate": "built", "codebook": "built", "pack": "built"}


def test_subset_needs_finished_upstream(tiny_llama, tmp_path):
    with pytest.raises(RecipeError, match="needs 'fetch'"):
        build(tiny_recipe(tiny_llama), outputs=tmp_path, stages=["rotate"])


def test_unknown_stage_names_the_valid_ones(tiny_llama, tmp_path):
    with pytest.raises(RecipeError, match="valid: \\['fetch', 'rotate'"):
        build(tiny_recipe(tiny_llama), outputs=tmp_path, stages=["fetch", "quantise"])


def test_uncovered_layer_is_an_error_listing_it(tiny_llama, tmp_path):
    r = Recipe.from_config({"name": "tiny", "model": {"kind": "local", "path": str(tiny_llama)},
                            "rules": [{"pattern": r"self_attn\.", "bits": 3}]})
    with pytest.raises(RecipeError, match=r"match no rule.*mlp\.down_proj"):
        build(r, outputs=tmp_path, stages=["fetch", "rotate"])
    assert not (tmp_path / "tiny" / "rotate").exists()  # nothing half-written looks complete


def test_failed_stage_leaves_no_finished_folder(tmp_path):
    bad = Recipe.from_config({"name": "bad", "model": {"kind": "local", "path": str(tmp_path / "nowhere")},
                              "rules": [{"pattern": "x", "bits": 2}]})
    from tqpipe.sources.files import SourceError

    with pytest.raises(SourceError, match="not a folder"):
        build(bad, outputs=tmp_path, stages=["fetch"])
    assert not (tmp_path / "bad" / "fetch").exists()
