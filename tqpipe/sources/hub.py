"""A Hugging Face Hub repository, downloaded with huggingface_hub."""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from tqpipe.sources.files import MODEL_PATTERNS, SourceError

log = logging.getLogger(__name__)


def fetch_hub_snapshot(repo: str, revision: str) -> Path:
    """Download (or find in the local Hub cache) the model files of ``repo@revision``."""
    offline = bool(constants.HF_HUB_OFFLINE)
    if offline:
        log.info("HF_HUB_OFFLINE is set: using only the local Hub cache for %s@%s", repo, revision)
    try:
        path = snapshot_download(repo, revision=revision, allow_patterns=list(MODEL_PATTERNS))
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else "the Hub cannot be reached"
        raise SourceError(
            f"cannot fetch {repo}@{revision}: {why}. Connect to the network (and unset HF_HUB_OFFLINE), "
            "or download it elsewhere and use a `local` source."
        ) from e
    except Exception as e:  # repository not found, gated, bad revision, HTTP errors
        raise SourceError(f"cannot fetch {repo}@{revision} from the Hub: {type(e).__name__}: {e}") from e
    return Path(path)
