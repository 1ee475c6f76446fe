"""Publishing a model folder to the Hugging Face Hub, in one commit, through huggingface_hub.

The endpoint comes from `HF_ENDPOINT` like every Hub tool, the token from the usual places (argument, `HF_TOKEN`,
saved login). Pushing unchanged files makes no commit: huggingface_hub asks the Hub for each file's current git oid
(the "preupload" call) and drops files whose content already matches. Transient failures are retried a bounded number
of times; every failure ends in one `HfCompressError` line that never contains the token.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from .errors import HfCompressError
from .run_dir import STAGE_RECORD_FILE, METRICS_FILE, FINGERPRINT_FILE, RunDir

try:  # huggingface_hub >= 2 talks HTTP through httpx2, earlier versions through httpx
    from httpx2 import TransportError
except ImportError:
    from httpx import TransportError

# Run bookkeeping that is not part of the model: stage records and logs may name local paths.
RUN_BOOKKEEPING_PATTERNS = [STAGE_RECORD_FILE, METRICS_FILE, FINGERPRINT_FILE, "*.log", "checkpoint-*/*", ".*.tmp"]
RETRYABLE_STATUS_CODES = {408, 429, 500, 502, 503, 504}
RETRY_BASE_WAIT_S = 1.0
TOKEN_SCAN_MAX_BYTES = 2_000_000  # the token can only leak through small text files (configs, cards)
RETRY_HINT = "retry with `hfcompress push RUN_DIR --repo-id {repo_id}` (files already on the Hub are skipped)"


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    endpoint: str
    files: list[tuple[str, int]]  # (path in repo, size in bytes) of every file considered
    dry_run: bool = False
    new_commit: bool = False
    commit_url: str | None = None
    repo_url: str | None = None

    def summary(self) -> str:
        where = f"{self.endpoint}/{self.repo_id} (revision {self.revision})"
        total_mb = sum(size for _, size in self.files) / 1e6
        if self.dry_run:
            lines = [f"dry run: would upload {len(self.files)} file(s), {total_mb:.1f} MB, to {where}"]
            lines += [f"  {path}  {size:,} bytes" for path, size in self.files]
            return "\n".join(lines)
        if self.new_commit:
            return f"pushed {len(self.files)} file(s), {total_mb:.1f} MB, to {where}: {self.commit_url}"
        return f"{where} already holds these exact files: no new commit"


def push_to_hub(
    folder: Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    dry_run: bool = False,
    max_retries: int = 3,
) -> PushResult:
    """Upload `folder` (a model checkpoint with its card) to `repo_id` in one commit; never modifies the folder."""
    folder = Path(folder)
    if create_pr and revision not in (None, constants.DEFAULT_REVISION):
        raise HfCompressError("a pull request always targets the default branch: use either create_pr or a revision")
    files = files_to_upload(folder)
    result = PushResult(repo_id=repo_id, revision=revision or constants.DEFAULT_REVISION,
                        endpoint=constants.ENDPOINT, files=files, dry_run=dry_run)
    if dry_run:
        return result
    token = _resolve_token(token)
    _refuse_files_containing(folder, files, token)
    api = HfApi(token=token, library_name="hfcompress")
    message = commit_message or "Upload compressed model with hfcompress"
    try:
        return _with_retries(
            lambda: _push_once(api, folder, result, private=private, create_pr=create_pr, message=message),
            max_retries=max_retries,
        )
    except HfHubHTTPError as error:
        raise HfCompressError(_redact(_describe_http_error(error, result), token)) from None
    except TransportError as error:
        raise HfCompressError(_redact(
            f"could not reach the Hub at {result.endpoint} ({type(error).__name__}: {error}) after "
            f"{max_retries + 1} attempt(s); {folder} is unchanged; " + RETRY_HINT.format(repo_id=repo_id), token
        )) from None
    except ValueError as error:  # huggingface_hub's validation: bad repo id, invalid card metadata
        raise HfCompressError(_redact(f"push to {repo_id}: {' '.join(str(error).split())}", token)) from None


def push_run(run_dir: Path, repo_id: str, **options) -> PushResult:
    """Push a run's final checkpoint (`final_model_dir` in results.json); options as for `push_to_hub`."""
    run_dir = Path(run_dir)
    results = RunDir(run_dir).load_results()
    if not results.final_model_dir:
        raise HfCompressError(f"{run_dir}: the run has produced no model yet, nothing to push")
    options.setdefault("commit_message", f"Upload compressed model from hfcompress run {results.name}")
    return push_to_hub(Path(run_dir) / results.final_model_dir, repo_id, **options)


def files_to_upload(folder: Path) -> list[tuple[str, int]]:
    """The files `upload_folder` will send, with their sizes, run bookkeeping left out."""
    if not folder.is_dir():
        raise HfCompressError(f"{folder}: not a folder (push the run's final checkpoint folder)")
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    kept = filter_repo_objects(paths, ignore_patterns=ignore_patterns())
    files = [(path, (folder / path).stat().st_size) for path in kept]
    if not any(path == "config.json" for path, _ in files):
        raise HfCompressError(f"{folder}: no config.json, this is not a model checkpoint folder")
    return files


def ignore_patterns() -> list[str]:
    return [*RUN_BOOKKEEPING_PATTERNS, *DEFAULT_IGNORE_PATTERNS]


def _push_once(api: HfApi, folder: Path, result: PushResult, *, private: bool, create_pr: bool,
               message: str) -> PushResult:
    repo_url = api.create_repo(result.repo_id, private=private, exist_ok=True)
    if result.revision != constants.DEFAULT_REVISION:
        api.create_branch(result.repo_id, branch=result.revision, exist_ok=True)
    head_before = api.repo_info(result.repo_id, revision=result.revision).sha
    commit = api.upload_folder(
        repo_id=result.repo_id, folder_path=folder, revision=None if create_pr else result.revision,
        create_pr=create_pr, commit_message=message, ignore_patterns=ignore_patterns(),
    )
    new_commit = commit.oid != head_before
    return PushResult(
        repo_id=result.repo_id, revision=result.revision, endpoint=result.endpoint, files=result.files,
        new_commit=new_commit, commit_url=(commit.pr_url or commit.commit_url) if new_commit else None,
        repo_url=str(repo_url),
    )


def _with_retries(push, max_retries: int) -> PushResult:
    """Retry transient failures (5xx, 429, dropped connections) with exponential backoff; re-raise the last one."""
    for attempt in range(max_retries + 1):
        try:
            return push()
        except (HfHubHTTPError, TransportError) as error:
            transient = isinstance(error, TransportError) or _status(error) in RETRYABLE_STATUS_CODES
            if not transient or attempt == max_retries:
                raise
            time.sleep(RETRY_BASE_WAIT_S * 2**attempt)
    raise AssertionError("unreachable")


def _resolve_token(token: str | None) -> str:
    if constants.is_offline_mode():
        raise HfCompressError("offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set): unset it to push")
    token = token or get_token()
    if not token:
        raise HfCompressError(
            "no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass a token with write access"
        )
    return token


def _refuse_files_containing(folder: Path, files: list[tuple[str, int]], token: str) -> None:
    needle = token.encode()
    for path, size in files:
        if size <= TOKEN_SCAN_MAX_BYTES and needle in (folder / path).read_bytes():
            raise HfCompressError(f"{folder / path} contains your Hub token: remove it before pushing")


def _status(error: HfHubHTTPError) -> int | None:
    return error.response.status_code if error.response is not None else None


def _describe_http_error(error: HfHubHTTPError, result: PushResult) -> str:
    status = _status(error)
    where = f"{result.endpoint}/{result.repo_id}"
    if status in (401, 403):
        return (f"the Hub rejected the token (HTTP {status}) for {where}: check HF_TOKEN or `hf auth login`, and that "
                f"the token can write to {result.repo_id.split('/')[0]!r}")
    server_message = " ".join((error.server_message or "").split()) or "no details from the server"
    return f"push to {where} failed (HTTP {status}: {server_message}); " + RETRY_HINT.format(repo_id=result.repo_id)


def _redact(text: str, token: str | None) -> str:
    """Belt and braces: no message ever carries the token, even if a server echoed it back."""
    if token:
        text = text.replace(token, "<token>")
    return re.sub(r"hf_[A-Za-z0-9]{20,}", "<token>", text)
