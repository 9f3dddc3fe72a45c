"""Pushing a finished local export to the Hugging Face Hub, with retries, never touching the local copy.

The token is read only from the environment (`HF_TOKEN` by default) or huggingface_hub's cached login (`hf auth
login`); never from configs, which are saved next to checkpoints. `huggingface_hub.HfApi` does the work:
`create_repo(exist_ok=True)` then `upload_folder`, retried with exponential backoff on any exception; the result is
a `PushResult` whose `error` says what failed after the last attempt, so the caller can report it while the local
export stays where it is.

Real-size exports (tens to hundreds of GB): in huggingface_hub >= 1.x with hf_xet (both pulled in by transformers)
`upload_folder` streams the files, splits large folders into several commits and resumes an interrupted upload
when called again (committed files skipped, uploaded chunks deduplicated) -- what `upload_large_folder` did in
older versions, which 2.x no longer has. So a retry, or `retry_command`, continues where the last attempt stopped.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

IGNORE = [".qmoe_export"]  # our export marker: local bookkeeping, not part of the model


def retry_command(folder: str | os.PathLike, repo_id: str) -> str:
    """What a user runs to push (or resume pushing) an export by hand: the `hf` CLI of huggingface_hub >= 1.0
    (`huggingface-cli` is gone there)."""
    return f"hf upload {repo_id} {folder} . --repo-type model --exclude {IGNORE[0]}"


@dataclass
class PushResult:
    ok: bool
    repo_id: str
    attempts: int
    url: str | None = None
    error: str | None = None


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = True,
    token_env: str = "HF_TOKEN",
    retries: int = 3,
    backoff_s: float = 5.0,
    commit_message: str = "Upload fine-tuned model",
    api=None,
    sleep=time.sleep,
) -> PushResult:
    """Upload every file of `folder` to the model repo `repo_id` (created if missing)."""
    folder = Path(folder)
    if not folder.is_dir():
        return PushResult(False, repo_id, 0, error=f"{folder} is not a directory")
    token = os.environ.get(token_env) or None
    if token is None:
        log.warning("%s is not set: pushing to %s with the cached login, if any", token_env, repo_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    error = None
    attempts = max(1, retries)
    for attempt in range(1, attempts + 1):
        try:
            api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True, token=token)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                     commit_message=commit_message, token=token, ignore_patterns=IGNORE)
            url = getattr(info, "commit_url", None) or (str(info) if info is not None else None)
            return PushResult(True, repo_id, attempt, url=url)
        except Exception as err:  # network, auth, rate limit: all retried, reported at the end
            error = f"{type(err).__name__}: {err}"
            log.warning("hub push to %s failed (attempt %d/%d): %s", repo_id, attempt, attempts, error)
            if attempt < attempts:
                sleep(backoff_s * 2 ** (attempt - 1))
    return PushResult(False, repo_id, attempts, error=error)
