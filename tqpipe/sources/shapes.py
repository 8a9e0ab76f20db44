"""A model's tensor inventory (names, shapes, dtypes) without reading a weight.

For planning: the local safetensors headers, the Hub's safetensors metadata
(a few kilobytes over HTTP for a 240 GB repo), or, offline, the tensor list
that the config alone implies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from tqpipe.model_io import hf_tensor_shapes
from tqpipe.recipe import HubSource, LocalSource, Recipe
from tqpipe.sources.files import SourceError

# safetensors dtype names, as both the headers and huggingface_hub spell them
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1}
TORCH_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: "BF16", "F32", ...


@dataclass(frozen=True)
class Inventory:
    config: dict
    tensors: dict[str, TensorInfo]
    origin: str  # where the shapes came from, for the plan's header


def from_folder(folder: Path) -> Inventory:
    """A Hugging Face folder: config.json plus every safetensors header."""
    config = json.loads((folder / "config.json").read_text())
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                tensors[name] = TensorInfo(tuple(sl.get_shape()), sl.get_dtype())
    if not tensors:
        raise SourceError(f"no *.safetensors in {folder}")
    return Inventory(config, tensors, f"safetensors headers in {folder}")


def from_config(config: dict, origin: str) -> Inventory:
    """The tensors the config implies, in the checkpoint's own layout and ``torch_dtype``."""
    dtype = TORCH_DTYPES.get(config.get("torch_dtype", "bfloat16"), "BF16")
    return Inventory(config, {k: TensorInfo(s, dtype) for k, s in hf_tensor_shapes(config).items()},
                     f"{origin} (tensor list built from the config alone)")


def from_hub(repo: str, revision: str) -> Inventory:
    """config.json and the safetensors metadata of a Hub repo: no weight is downloaded."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    try:
        config = json.loads(Path(hf_hub_download(repo, "config.json", revision=revision)).read_text())
        meta = get_safetensors_metadata(repo, revision=revision)
    except Exception as e:  # offline, not found, gated, HTTP errors
        raise SourceError(
            f"cannot read the shapes of {repo}@{revision} from the Hub ({type(e).__name__}: {e}). "
            "Offline, give the recipe a local copy of the repo's config.json as `model.config`."
        ) from e
    tensors = {name: TensorInfo(tuple(t.shape), t.dtype)
               for fm in meta.files_metadata.values() for name, t in fm.tensors.items()}
    return Inventory(config, tensors, f"Hub safetensors metadata of {repo}@{revision}")


def inventory(recipe: Recipe, fetched: Path | None = None) -> Inventory | None:
    """The best inventory available before ``fetch`` (or from its folder); ``None`` for GGUF sources,
    whose layout is known only after conversion."""
    if fetched is not None and (fetched / "config.json").exists():
        return from_folder(fetched)
    src = recipe.model
    if isinstance(src, LocalSource):
        return from_folder(src.path)
    if isinstance(src, HubSource):
        if src.config is not None:
            return from_config(json.loads(Path(src.config).read_text()), str(src.config))
        return from_hub(src.repo, src.revision)
    return None  # GGUF sources
