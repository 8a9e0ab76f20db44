"""publish: the repository folder (model files + model card), and optionally the upload.

The card is rendered through ``huggingface_hub.ModelCard`` from a Jinja2
template, filled only from ``validate.json``, the manifests and the recipe.
Upload (``recipe.publish.push=true``) uses ``create_repo`` + ``upload_folder``;
the token comes from ``HF_TOKEN`` or the HF login and is never written anywhere.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from omegaconf import OmegaConf

from tqpipe.manifest import invocation, read_manifest, sha256_json
from tqpipe.recipe import Recipe
from tqpipe.sources.files import link_or_copy
from tqpipe.stages.context import StageContext

log = logging.getLogger(__name__)

NEEDS = ("fetch", "pack", "validate")
SKIP = {"manifest.json"}


CARD_TEMPLATE = resources.files("tqpipe") / "templates" / "model_card.md.j2"
LARGE_FOLDER_BYTES = 5 << 30  # above this, upload_large_folder (resumable, parallel) where the hub client has it


def settings(recipe: Recipe) -> dict[str, Any]:
    # the card shows the whole recipe; a new card template re-renders every card (`stages=[publish]`)
    return recipe.dump() | {"card_template": sha256_json(CARD_TEMPLATE.read_text())}


def card_values(recipe: Recipe, validation: dict[str, Any], pack_manifest: dict[str, Any],
                fetch_manifest: dict[str, Any]) -> dict[str, Any]:
    """Everything the card shows, from stored results only: rendering it twice gives the same bytes."""
    rec = recipe.dump()
    fetch_summary = fetch_manifest["summary"]
    return validation | {
        "name": recipe.name,
        "description": recipe.description,
        "base_model": recipe.publish.base_model,
        "source": fetch_summary.get("source", recipe.model.kind),
        "source_sha256": fetch_summary.get("gguf_sha256"),
        "source_commit": fetch_summary.get("commit"),
        "input_hashes": {f: h for f, h in fetch_manifest["outputs"].items() if f.endswith((".safetensors", ".gguf"))},
        "rules": rec["rules"], "protected": rec["protected"], "kept_dtype": recipe.kept_dtype,
        "scale_method": recipe.codebook.scale_method,
        "calibration_tokens": recipe.calibration.tokens, "calibration_text": recipe.calibration.text,
        "recipe_yaml": OmegaConf.to_yaml(rec).strip(),
        "versions": pack_manifest["versions"],
        "weight_hashes": {f: h for f, h in pack_manifest["outputs"].items() if f.endswith(".safetensors")},
        "local_dir": recipe.publish.repo_id or f"outputs/{recipe.name}/publish",
        "command": pack_manifest.get("command", invocation()),  # the command that built the weights
    }


def render_card(recipe: Recipe, values: dict[str, Any]) -> ModelCard:
    data = ModelCardData(
        library_name="mlx", license=recipe.publish.license, base_model=recipe.publish.base_model,
        pipeline_tag="text-generation",
        tags=["mlx", "tqpipe", "turboquant", "quantized", *recipe.publish.tags],
    )
    return ModelCard.from_template(data, template_str=CARD_TEMPLATE.read_text(), **values)


def upload(folder: Path, recipe: Recipe) -> str:
    from huggingface_hub import HfApi

    p = recipe.publish
    api = HfApi()
    api.create_repo(p.repo_id, private=p.private, exist_ok=True)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    if size > LARGE_FOLDER_BYTES and hasattr(api, "upload_large_folder"):
        api.upload_large_folder(repo_id=p.repo_id, folder_path=str(folder), repo_type="model")
        return f"upload_large_folder to {p.repo_id}"
    info = api.upload_folder(repo_id=p.repo_id, folder_path=str(folder), commit_message=p.commit_message)
    return str(info)


def run(ctx: StageContext) -> dict[str, Any]:
    packed, validated = ctx.inputs["pack"], ctx.inputs["validate"]
    for f in sorted(packed.iterdir()):
        if f.is_file() and f.name not in SKIP:
            link_or_copy(f, ctx.out / f.name)
    for name in ("validate.json", "layer_errors.json", "layer_errors.png"):
        link_or_copy(validated / name, ctx.out / name)
    (ctx.out / "recipe.yaml").write_text(OmegaConf.to_yaml(ctx.recipe.dump()))
    validation = json.loads((validated / "validate.json").read_text())
    values = card_values(ctx.recipe, validation, read_manifest(packed), read_manifest(ctx.inputs["fetch"]))
    render_card(ctx.recipe, values).save(ctx.out / "README.md")

    files = sorted(p.name for p in ctx.out.iterdir())
    target = ctx.recipe.publish.repo_id
    if ctx.recipe.publish.push:
        if not target:
            raise ValueError("recipe.publish.push is true but recipe.publish.repo_id is not set")
        log.info("uploading %d files to %s", len(files), target)
        return {"pushed": True, "repo_id": target, "files": files, "commit": upload(ctx.out, ctx.recipe)}
    log.info("dry run: would upload %d files to %s: %s", len(files), target or "<no repo_id set>", ", ".join(files))
    return {"pushed": False, "repo_id": target, "files": files}
