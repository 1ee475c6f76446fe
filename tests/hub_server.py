"""A small stand-in for the Hugging Face Hub, for tests only: a threaded HTTP server on 127.0.0.1.

It speaks the part of the Hub protocol that huggingface_hub uses to create a repo and a branch, upload a folder in
one commit, and read it back (`hf_hub_download`, `snapshot_download`, `from_pretrained`, `model_info`,
`list_repo_files`). Files always travel inline ("regular" upload mode, base64 in the commit), never as LFS/Xet.
Repos live in memory. Every request is recorded so tests can assert on what a client did.

Auth: a request whose `Authorization: Bearer ...` names a token other than `valid_token` gets a 401; writes need the
valid token; private repos are invisible (401/404 `RepoNotFound`) without it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(content: bytes) -> str:
    """The git object id of a file, as the Hub reports it for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)

    def add_commit(self, branch: str, message: str, files: dict[str, bytes]) -> Commit:
        parent = self.branches.get(branch)
        digest = hashlib.sha1(json.dumps([parent, message, sorted((p, git_blob_oid(c)) for p, c in files.items()),
                                          time.time_ns()]).encode())
        commit = Commit(oid=digest.hexdigest(), parent=parent, message=message, files=files)
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        return commit

    def history(self, branch: str) -> list[Commit]:
        """The commits reachable from a branch head, newest first."""
        commits, oid = [], self.branches.get(branch)
        while oid is not None:
            commits.append(self.commits[oid])
            oid = self.commits[oid].parent
        return commits


@dataclass
class RecordedRequest:
    method: str
    path: str
    status: int
    authorization: str | None


class HubState:
    """Everything the server knows; tests read it and may schedule failures."""

    def __init__(self, valid_token: str):
        self.valid_token = valid_token
        self.repos: dict[str, Repo] = {}
        self.requests: list[RecordedRequest] = []
        self.failures: dict[str, int] = {}  # route name -> how many upcoming calls answer 503
        self.lock = threading.Lock()

    def fail_next(self, route: str, times: int = 1) -> None:
        self.failures[route] = times

    def take_failure(self, route: str) -> bool:
        if self.failures.get(route, 0) > 0:
            self.failures[route] -= 1
            return True
        return False

    def commit_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST" and "/commit/" in r.path]


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code
        self.headers, self.extra = headers or {}, extra or {}


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "LocalHub"

    def log_message(self, format, *args):  # keep pytest output quiet
        pass

    # ------------------------------------------------------------------------------------------ dispatch

    def do_GET(self):
        self._handle()

    def do_HEAD(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def _handle(self):
        state = self.server.state
        url = urlsplit(self.path)
        self.segments = [unquote(part) for part in url.path.strip("/").split("/")]
        self.query = {key: values[0] for key, values in parse_qs(url.query).items()}
        self.body = self._read_body()
        status = 500
        try:
            with state.lock:
                status, payload, headers = self._route(state)
        except HubError as error:
            status = error.status
            headers = dict(error.headers)
            if error.error_code:
                headers["X-Error-Code"] = error.error_code
            payload = {"error": error.message, **error.extra}
        finally:
            state.requests.append(RecordedRequest(self.command, url.path, status, self.headers.get("authorization")))
        self._respond(status, payload, headers)

    def _route(self, state: HubState):
        method, parts = self.command, self.segments
        if parts[:1] == ["api"]:
            if method == "POST" and parts[1:] == ["repos", "create"]:
                return self._create_repo(state)
            if method == "POST" and parts[1:] == ["validate-yaml"]:
                return self._validate_yaml()
            if len(parts) >= 4 and parts[1] == "models":
                repo_id, action, rest = f"{parts[2]}/{parts[3]}", parts[4:5], parts[5:]
                if method == "POST" and action == ["preupload"]:
                    return self._preupload(state, repo_id, rest[0])
                if method == "POST" and action == ["commit"]:
                    return self._commit(state, repo_id, rest[0])
                if method == "POST" and action == ["branch"]:
                    return self._create_branch(state, repo_id, rest[0])
                if method == "GET" and action == []:
                    return self._model_info(state, repo_id, "main")
                if method == "GET" and action == ["revision"]:
                    return self._model_info(state, repo_id, rest[0])
                if method == "GET" and action == ["tree"]:
                    return self._tree(state, repo_id, rest[0], "/".join(rest[1:]))
        elif len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(state, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise HubError(404, f"the test hub does not serve {method} {self.path}")

    # ------------------------------------------------------------------------------------------ auth

    def _caller_is_authorized(self, state: HubState) -> bool:
        header = self.headers.get("authorization")
        if header is None:
            return False
        if header != f"Bearer {state.valid_token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def _require_write(self, state: HubState) -> None:
        if not self._caller_is_authorized(state):
            raise HubError(401, "You must be authenticated to write to a repository")

    def _readable_repo(self, state: HubState, repo_id: str) -> Repo:
        authorized = self._caller_is_authorized(state)
        repo = state.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404 if authorized else 401, "Repository not found", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------------------------------------ writes

    def _create_repo(self, state: HubState):
        self._require_write(state)
        if state.take_failure("create"):
            raise HubError(503, "Service temporarily unavailable")
        request = json.loads(self.body)
        repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
        url = f"{self.server.url}/{repo_id}"
        if repo_id in state.repos:
            # Like the real Hub, the conflict answer still names the repo url.
            raise HubError(409, "You already created this model repo", extra={"url": url})
        repo = Repo(repo_id=repo_id, private=request.get("visibility") == "private")
        repo.add_commit("main", "initial commit", {".gitattributes": GITATTRIBUTES})
        state.repos[repo_id] = repo
        return 200, {"url": url, "name": repo_id}, {}

    def _validate_yaml(self):
        content = json.loads(self.body)["content"]
        if content.startswith("---"):
            header = content.split("---", 2)[1]
            try:
                metadata = yaml.safe_load(header)
            except yaml.YAMLError as error:
                return 400, {"errors": [{"message": f"invalid YAML: {error}"}]}, {}
            if not isinstance(metadata, dict):
                return 400, {"errors": [{"message": "metadata must be a mapping"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _preupload(self, state: HubState, repo_id: str, revision: str):
        self._require_write(state)
        repo = self._readable_repo(state, repo_id)
        commit = repo.resolve(revision)
        existing = commit.files if commit else {}
        files = [
            {
                "path": item["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_oid(existing[item["path"]]) if item["path"] in existing else None,
            }
            for item in json.loads(self.body)["files"]
        ]
        return 200, {"files": files, "commitOid": commit.oid if commit else None}, {}

    def _commit(self, state: HubState, repo_id: str, branch: str):
        self._require_write(state)
        repo = self._readable_repo(state, repo_id)
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header, operations = lines[0]["value"], lines[1:]
        files = dict(repo.resolve(branch).files)
        for operation in operations:
            key, value = operation["key"], operation["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: content for path, content in files.items() if not path.startswith(prefix)}
            else:
                raise HubError(400, f"the test hub only accepts inline files, got {key!r}")
        commit = repo.add_commit(branch, header["summary"], files)
        body = {"commitUrl": f"{self.server.url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid,
                "success": True, "pullRequestUrl": None}
        return 200, body, {}

    def _create_branch(self, state: HubState, repo_id: str, branch: str):
        self._require_write(state)
        repo = self._readable_repo(state, repo_id)
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        starting_point = json.loads(self.body or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = self._commit_at(repo, starting_point).oid
        return 200, {}, {}

    # ------------------------------------------------------------------------------------------ reads

    def _model_info(self, state: HubState, repo_id: str, revision: str):
        repo = self._readable_repo(state, repo_id)
        commit = self._commit_at(repo, revision)
        siblings = [{"rfilename": path, "size": len(content), "blobId": git_blob_oid(content)}
                    for path, content in sorted(commit.files.items())]
        body = {"id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": repo.private,
                "lastModified": "2025-01-01T00:00:00.000Z", "tags": [], "siblings": siblings}
        return 200, body, {}

    def _tree(self, state: HubState, repo_id: str, revision: str, folder: str):
        repo = self._readable_repo(state, repo_id)
        commit = self._commit_at(repo, revision)
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        entries, folders = [], set()
        for path, content in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            inner = path[len(prefix):]
            if "/" in inner and not recursive:
                folders.add(prefix + inner.split("/")[0])
                continue
            entries.append({"type": "file", "oid": git_blob_oid(content), "size": len(content), "path": path})
        if prefix and not entries and not folders:
            raise HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": path} for path in sorted(folders)]
        return 200, entries, {}

    def _resolve(self, state: HubState, repo_id: str, revision: str, path: str):
        repo = self._readable_repo(state, repo_id)
        commit = self._commit_at(repo, revision)
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        content = commit.files[path]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_oid(content)}"',
                   "Content-Type": "application/octet-stream"}
        return 200, content, headers

    # ------------------------------------------------------------------------------------------ HTTP plumbing

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _respond(self, status: int, payload, headers: dict) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class LocalHub(ThreadingHTTPServer):
    """The server; `with LocalHub(token) as hub:` serves on `hub.url` in a background thread."""

    daemon_threads = True

    def __init__(self, valid_token: str):
        super().__init__(("127.0.0.1", 0), HubRequestHandler)
        self.state = HubState(valid_token)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
        self.server_close()
