"""publish: the repository folder (model files + model card), and optionally the upload.

The card is rendered through ``huggingface_hub.ModelCard`` from a Jinja2
template, filled only from ``validate.json``, the manifests and the recipe.
Upload (``recipe.publish.push=true``) uses ``create_repo`` + ``upload_folder``;
the token comes from ``HF_TOKEN`` or the HF login and is never written anywhere.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from omegaconf import OmegaConf

from tqpipe.manifest import read_manifest
from tqpipe.recipe import Recipe
from tqpipe.sources.files import link_or_copy
from tqpipe.stages.context import StageContext

log = logging.getLogger(__name__)

NEEDS = ("fetch", "pack", "validate")
SKIP = {"manifest.json"}


def settings(recipe: Recipe) -> dict[str, Any]:
    return recipe.dump()  # the card shows the whole recipe


def card_values(recipe: Recipe, validation: dict[str, Any], pack_manifest: dict[str, Any],
                fetch_summary: dict[str, Any]) -> dict[str, Any]:
    rec = recipe.dump()
    return validation | {
        "name": recipe.name,
        "description": recipe.description,
        "base_model": recipe.publish.base_model,
        "source": fetch_summary.get("source", recipe.model.kind),
        "source_sha256": fetch_summary.get("gguf_sha256"),
        "rules": rec["rules"], "protected": rec["protected"], "kept_dtype": recipe.kept_dtype,
        "scale_method": recipe.codebook.scale_method,
        "calibration_tokens": recipe.calibration.tokens, "calibration_text": recipe.calibration.text,
        "recipe_yaml": OmegaConf.to_yaml(rec).strip(),
        "versions": pack_manifest["versions"],
        "weight_hashes": {f: h for f, h in pack_manifest["outputs"].items() if f.endswith(".safetensors")},
        "local_dir": recipe.publish.repo_id or f"outputs/{recipe.name}/publish",
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def render_card(recipe: Recipe, values: dict[str, Any]) -> ModelCard:
    data = ModelCardData(
        library_name="mlx", license=recipe.publish.license, base_model=recipe.publish.base_model,
        pipeline_tag="text-generation",
        tags=["mlx", "tqpipe", "turboquant", "quantized", *recipe.publish.tags],
    )
    template = resources.files("tqpipe") / "templates" / "model_card.md.j2"
    return ModelCard.from_template(data, template_str=template.read_text(), **values)


def upload(folder: Path, recipe: Recipe) -> str:
    from huggingface_hub import HfApi

    p = recipe.publish
    api = HfApi()
    api.create_repo(p.repo_id, private=p.private, exist_ok=True)
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
    fetch_summary = read_manifest(ctx.inputs["fetch"])["summary"]
    values = card_values(ctx.recipe, validation, read_manifest(packed), fetch_summary)
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
