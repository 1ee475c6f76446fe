"""Publishing: push a tiny run to a local stand-in for the Hub, then read it back by repo id like any user would.

The pushes and downloads run in a subprocess with HF_ENDPOINT, HF_HOME and HF_TOKEN set before huggingface_hub is
imported, exactly as a user's shell would (huggingface_hub reads them at import time, and conftest turns offline
mode on for this process).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification,
                          BertTokenizerFast)

from hfcompress.card import write_model_card
from hub_server import LocalHub
from test_card import classification_results, classification_rows, classification_stages, write_fake_run

TOKEN = "hf_LocalHubTestToken0123456789abcdef"  # shaped like a real token, so any leak would be recognisable
REPO_ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["the film was great fun", "a boring movie , awful plot"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *"a the film movie was great fun boring awful plot".split()]
CLIENT_PRELUDE = """
import json
from pathlib import Path
import hfcompress.hub as hub
from hfcompress.errors import HfCompressError
hub.RETRY_BASE_WAIT_S = 0.01
def report(**values):
    print("RESULT " + json.dumps(values))
def push_or_error(*args, **kwargs):
    try:
        result = hub.push_run(*args, **kwargs)
        return {"summary": result.summary(), "new_commit": result.new_commit}
    except HfCompressError as error:
        return {"error": str(error)}
"""


@pytest.fixture
def hub():
    with LocalHub(valid_token=TOKEN) as server:
        yield server


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A finished run whose final checkpoint (03-distill) is a real tiny BERT classifier with its card."""
    results = classification_results(final_model_dir="03-distill", stages=classification_stages(("distill",)),
                                     rows=classification_rows()[:2])
    run = write_fake_run(tmp_path / "run", results=results, final_files={})
    save_tiny_classifier(run / "03-distill")
    for bookkeeping in ("stage.json", "metrics.json"):  # the pipeline writes these; they must stay local
        (run / "03-distill" / bookkeeping).write_text(json.dumps({"where": str(tmp_path)}))
    write_model_card(run, tmp_path / "model_cards", repo_id="alice/tiny-sentiment")
    return run


def published_files(run_dir: Path) -> set[str]:
    """What should reach the Hub: the final checkpoint without the pipeline's bookkeeping."""
    return {path.name for path in (run_dir / "03-distill").iterdir()} - {"stage.json", "metrics.json"}


def save_tiny_classifier(folder: Path) -> None:
    vocab_file = folder.parent / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        id2label={0: "rotten", 1: "fresh"}, label2id={"rotten": 0, "fresh": 1})
    BertForSequenceClassification(config).save_pretrained(folder)
    BertTokenizerFast(vocab_file=str(vocab_file)).save_pretrained(folder)


def run_client(code: str, home: Path, endpoint: str, token: str | None = TOKEN, prelude: str = CLIENT_PRELUDE,
               **extra_env: str) -> tuple[list[dict], str]:
    """Run `code` in a fresh interpreter configured like a user's shell; returns its RESULT records and all output."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "HF_XET_CACHE",
                          "HF_TOKEN_PATH", "HF_ENDPOINT")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=str(REPO_ROOT))
    if token is not None:
        env["HF_TOKEN"] = token
    env.update(extra_env)
    process = subprocess.run([sys.executable, "-c", prelude + code], env=env, cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=240)
    output = process.stdout + process.stderr
    assert process.returncode == 0, output
    records = [json.loads(line[len("RESULT "):]) for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    return records, output


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}


def assert_token_absent(output: str, *folders: Path, hub: LocalHub | None = None) -> None:
    assert TOKEN not in output
    for folder in folders:
        for path in folder.rglob("*"):
            assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
    for repo in (hub.state.repos.values() if hub else []):
        for commit in repo.commits.values():
            assert all(TOKEN.encode() not in content for content in commit.files.values())


def test_pushed_model_loads_back_by_repo_id_with_the_same_outputs(hub, run_dir, tmp_path):
    records, output = run_client(f"""
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForSequenceClassification, AutoTokenizer
first = push_or_error(Path({str(run_dir)!r}), "alice/tiny-sentiment")
second = push_or_error(Path({str(run_dir)!r}), "alice/tiny-sentiment")
tokenizer = AutoTokenizer.from_pretrained("alice/tiny-sentiment")
model = AutoModelForSequenceClassification.from_pretrained("alice/tiny-sentiment").eval()
with torch.no_grad():
    logits = model(**tokenizer({SENTENCES!r}, padding=True, return_tensors="pt")).logits.tolist()
card = ModelCard.load("alice/tiny-sentiment")
report(first=first, second=second, logits=logits, model_index=card.data.to_dict()["model-index"],
       files=HfApi().list_repo_files("alice/tiny-sentiment"))
""", tmp_path, hub.url)
    (result,) = records

    assert result["first"]["new_commit"] is True, result["first"]
    assert result["second"] == {"summary": f"{hub.url}/alice/tiny-sentiment (revision main) already holds these "
                                           "exact files: no new commit", "new_commit": False}
    history = hub.state.repos["alice/tiny-sentiment"].history("main")
    assert [commit.message for commit in history] == ["Upload compressed model from hfcompress run quickstart",
                                                      "initial commit"]
    assert len(hub.state.commit_requests()) == 1  # the second push sent no commit at all

    local = run_dir / "03-distill"
    assert set(result["files"]) == published_files(run_dir) | {".gitattributes"}
    assert {"README.md", "size_vs_quality.png", "model.safetensors", "tokenizer.json"} <= published_files(run_dir)

    reference = AutoModelForSequenceClassification.from_pretrained(local).eval()
    tokenizer = BertTokenizerFast.from_pretrained(local)
    with torch.no_grad():
        expected = reference(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=0, atol=1e-6)

    metrics = result["model_index"][0]["results"][0]["metrics"]
    assert {m["type"]: m["value"] for m in metrics} == {"accuracy": 0.84, "f1": 0.83}  # the 03-distill row
    for content in history[0].files.values():
        assert str(tmp_path).encode() not in content  # nothing published names the author's machine
    assert_token_absent(output, tmp_path, hub=hub)


def test_private_flag_and_branch_are_honoured(hub, run_dir, tmp_path):
    records, output = run_client(f"""
report(**push_or_error(Path({str(run_dir)!r}), "alice/private-tiny", private=True, revision="compressed"))
""", tmp_path, hub.url)

    assert records[0]["new_commit"] is True
    repo = hub.state.repos["alice/private-tiny"]
    assert repo.private
    assert set(repo.resolve("main").files) == {".gitattributes"}  # the default branch is untouched
    assert "config.json" in repo.resolve("compressed").files
    assert http_status(f"{hub.url}/api/models/alice/private-tiny", token=None) == 401
    assert http_status(f"{hub.url}/alice/private-tiny/resolve/compressed/config.json", token=None) == 401
    assert http_status(f"{hub.url}/alice/private-tiny/resolve/compressed/config.json", token=TOKEN) == 200
    assert_token_absent(output, tmp_path, hub=hub)


def http_status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_dry_run_lists_files_and_sizes_and_uploads_nothing(hub, run_dir, tmp_path):
    records, _ = run_client(f"""
report(**push_or_error(Path({str(run_dir)!r}), "alice/dry", dry_run=True))
""", tmp_path, hub.url, token=None)

    summary = records[0]["summary"]
    assert summary.startswith(f"dry run: would upload {len(published_files(run_dir))} file(s)")
    assert f"to {hub.url}/alice/dry (revision main)" in summary
    config_size = (run_dir / "03-distill" / "config.json").stat().st_size
    assert f"  config.json  {config_size:,} bytes" in summary.splitlines()
    assert "stage.json" not in summary and "metrics.json" not in summary
    assert hub.state.requests == []


def test_missing_or_rejected_token_gives_one_clear_line(hub, run_dir, tmp_path):
    before = folder_digest(run_dir)
    records, output = run_client(f"""
report(**push_or_error(Path({str(run_dir)!r}), "alice/tiny", token={TOKEN[::-1]!r}))
report(**push_or_error(Path({str(run_dir)!r}), "alice/tiny"))
""", tmp_path, hub.url, token=None)
    rejected, missing = (record["error"] for record in records)

    assert rejected.startswith(f"the Hub rejected the token (HTTP 401) for {hub.url}/alice/tiny")
    assert missing.startswith("no Hugging Face token: set HF_TOKEN")
    assert "\n" not in rejected + missing and TOKEN[::-1] not in output and "Traceback" not in output
    assert "alice/tiny" not in hub.state.repos
    assert folder_digest(run_dir) == before


def test_offline_mode_is_named_instead_of_failing_obscurely(hub, run_dir, tmp_path):
    records, _ = run_client(f"""
report(**push_or_error(Path({str(run_dir)!r}), "alice/tiny"))
""", tmp_path, hub.url, HF_HUB_OFFLINE="1")

    assert records[0]["error"] == "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set): unset it to push"
    assert hub.state.requests == []


def test_unreachable_endpoint_gives_one_clear_line(run_dir, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    records, output = run_client(f"""
report(**push_or_error(Path({str(run_dir)!r}), "alice/tiny", max_retries=0))
""", tmp_path, f"http://127.0.0.1:{closed_port}")

    error = records[0]["error"]
    assert error.startswith(f"could not reach the Hub at http://127.0.0.1:{closed_port} (ConnectError")
    assert "after 1 attempt(s)" in error and "hfcompress push RUN_DIR --repo-id alice/tiny" in error
    assert "\n" not in error and TOKEN not in output


def test_transient_errors_are_retried_a_bounded_number_of_times(hub, run_dir, tmp_path):
    hub.state.fail_next("create", times=4)  # 2 for the push that gives up, 2 for the one that gets through
    before = folder_digest(run_dir)
    records, output = run_client(f"""
report(**push_or_error(Path({str(run_dir)!r}), "alice/flaky", max_retries=1))
report(**push_or_error(Path({str(run_dir)!r}), "alice/flaky", max_retries=2))
""", tmp_path, hub.url)
    gave_up, got_through = records

    assert gave_up["error"].startswith(f"push to {hub.url}/alice/flaky failed (HTTP 503: ")
    assert gave_up["error"].endswith("retry with `hfcompress push RUN_DIR --repo-id alice/flaky` "
                                     "(files already on the Hub are skipped)")
    assert got_through["new_commit"] is True
    creates = [r.status for r in hub.state.requests if r.path == "/api/repos/create"]
    assert creates == [503, 503, 503, 503, 200]
    assert folder_digest(run_dir) == before
    assert_token_absent(output, tmp_path, hub=hub)
