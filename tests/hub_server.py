"""A small Hub-compatible HTTP server on loopback: the endpoints huggingface_hub uses to create a
repo, upload a folder (regular, non-LFS files) and download files, so tests can push and
``from_pretrained`` through the real client with ``HF_ENDPOINT`` pointing here.

Dataset repositories (:func:`add_dataset`) answer what ``datasets.load_dataset(id, streaming=True)``
asks: the repo info, its tree, paths-info and ranged file downloads. ``HubState.cut_downloads``
makes the next downloads of ``HubState.cut_suffix`` files close the socket half way through.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {"files", "sha"}}}
        self.datasets: dict[str, dict] = {}  # dataset repos, the same shape
        self.cut_downloads = 0  # how many of the next file downloads drop the connection half way
        self.cut_suffix = ".parquet"
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self.lock = threading.Lock()


def _sha(payload: bytes) -> str:
    return hashlib.sha1(payload).hexdigest()


class HubHandler(BaseHTTPRequestHandler):
    state: HubState

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # -- helpers -----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _repo(self, repo_id: str, kind: str = "models"):
        repo = (self.state.datasets if kind == "datasets" else self.state.repos).get(repo_id)
        if repo is None or (repo["private"] and not self.headers.get("Authorization")):
            self._error(404 if repo is None else 401, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        return repo

    def _record(self) -> None:
        with self.state.lock:
            self.state.requests.append((self.command, self.path, self.headers.get("Authorization")))

    # -- routes ------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._record()
        self._route()

    def do_HEAD(self) -> None:
        self._record()
        self._route()

    def do_POST(self) -> None:
        self._record()
        self._route()

    def _route(self) -> None:
        path = unquote(urlparse(self.path).path)
        if self.command == "GET" and path == "/api/whoami-v2":
            return self._json(200, {"name": "tester", "type": "user", "orgs": [], "auth": {}})
        if self.command == "POST" and path == "/api/validate-yaml":  # model-card metadata check
            self._body()
            return self._json(200, {"errors": [], "warnings": []})
        if self.command == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(self._body() or b"{}"))
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path)
        if match and self.command == "POST":
            return self._preupload(match.group(1), json.loads(self._body()))
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)
        if match and self.command == "POST":
            return self._commit(match.group(1), match.group(2), self._body())
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path)
        if match and self.command == "POST":
            return self._create_branch(match.group(1), match.group(2))
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if match and self.command == "GET":
            return self._model_info(match.group(1), match.group(2) or "main")
        match = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if match and self.command == "GET":
            return self._model_info(match.group(1), match.group(2) or "main", "datasets")
        match = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if match and self.command == "GET":
            recursive = parse_qs(urlparse(self.path).query).get("recursive", [""])[0].lower() == "true"
            return self._tree(match.group(1), match.group(2), match.group(3) or "", recursive)
        match = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)", path)
        if match and self.command == "POST":
            paths = parse_qs(self._body().decode()).get("paths", [])
            return self._paths_info(match.group(1), match.group(2), paths)
        match = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if match and self.command in ("GET", "HEAD"):
            return self._resolve(match.group(1), match.group(2), match.group(3), "datasets")
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if match and self.command in ("GET", "HEAD"):
            return self._resolve(match.group(1), match.group(2), match.group(3))
        return self._error(404, "EntryNotFound", f"unsupported endpoint {self.command} {path}")

    def _create_repo(self, payload: dict) -> None:
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._error(409, "RepoExists", "You already created this model repo")
            private = bool(payload.get("private")) or payload.get("visibility") == "private"
            self.state.repos[repo_id] = {"private": private, "branches": {"main": {"files": {}, "sha": "0" * 40}}}
        port = self.server.server_address[1]
        self._json(200, {"url": f"http://127.0.0.1:{port}/{repo_id}", "name": repo_id, "id": repo_id})

    def _create_branch(self, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if branch in repo["branches"]:
            return self._error(409, "BranchExists", "Branch already exists")
        main = repo["branches"]["main"]
        repo["branches"][branch] = {"files": dict(main["files"]), "sha": main["sha"]}
        self._json(200, {})

    def _preupload(self, repo_id: str, payload: dict) -> None:
        if self._repo(repo_id) is None:
            return
        files = [{"path": item["path"], "uploadMode": "regular", "shouldIgnore": False} for item in payload["files"]]
        self._json(200, {"files": files, "commitOid": None})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        branch = repo["branches"].setdefault(revision, {"files": {}, "sha": "0" * 40})
        summary = ""
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                summary = item["value"].get("summary", "")
            elif item["key"] == "file":
                value = item["value"]
                branch["files"][value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                branch["files"].pop(item["value"]["path"], None)
        branch["sha"] = _sha((branch["sha"] + summary + str(sorted(branch["files"]))).encode())
        branch["summary"] = summary
        port = self.server.server_address[1]
        self._json(
            200,
            {
                "commitUrl": f"http://127.0.0.1:{port}/{repo_id}/commit/{branch['sha']}",
                "commitOid": branch["sha"],
                "pullRequestUrl": None,
            },
        )

    @staticmethod
    def _branch(repo: dict, revision: str) -> dict | None:
        """A branch by name, or the branch whose head is the commit ``revision``."""
        if revision in repo["branches"]:
            return repo["branches"][revision]
        return next((branch for branch in repo["branches"].values() if branch["sha"] == revision), None)

    def _repo_branch(self, repo_id: str, revision: str, kind: str = "models") -> tuple[dict, dict] | None:
        """The repo and branch, or None after answering with the Hub's error."""
        repo = self._repo(repo_id, kind)
        if repo is None:
            return None
        branch = self._branch(repo, revision)
        if branch is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, branch

    def _model_info(self, repo_id: str, revision: str, kind: str = "models") -> None:
        found = self._repo_branch(repo_id, revision, kind)
        if found is None:
            return
        repo, branch = found
        self._json(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": branch["sha"],
                "private": repo["private"],
                "siblings": [{"rfilename": name} for name in sorted(branch["files"])],
            },
        )

    @staticmethod
    def _entries(branch: dict, folder: str, recursive: bool) -> list[dict]:
        """The tree API's entries under ``folder``: files, and the folders on the way."""
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}
        for name, payload in sorted(branch["files"].items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                if depth > 1 and not recursive:
                    break
                sub = prefix + "/".join(parts[:depth])
                entries.setdefault(sub, {"type": "directory", "oid": _sha(sub.encode()), "path": sub})
            if len(parts) == 1 or recursive:
                entries[name] = {"type": "file", "oid": _sha(payload), "size": len(payload), "path": name}
        return list(entries.values())

    def _tree(self, repo_id: str, revision: str, folder: str, recursive: bool) -> None:
        found = self._repo_branch(repo_id, revision, "datasets")
        if found is None:
            return
        entries = self._entries(found[1], folder, recursive)
        if folder and not entries:
            return self._error(404, "EntryNotFound", f"{folder} does not exist")
        self._json(200, entries)

    def _paths_info(self, repo_id: str, revision: str, paths: list[str]) -> None:
        found = self._repo_branch(repo_id, revision, "datasets")
        if found is None:
            return
        entries = {entry["path"]: entry for entry in self._entries(found[1], "", recursive=True)}
        self._json(200, [entries[path.strip("/")] for path in paths if path.strip("/") in entries])

    def _resolve(self, repo_id: str, revision: str, filename: str, kind: str = "models") -> None:
        found = self._repo_branch(repo_id, revision, kind)
        if found is None:
            return
        branch = found[1]
        if filename not in branch["files"]:
            return self._error(404, "EntryNotFound", f"{filename} does not exist")
        payload = branch["files"][filename]
        headers = {"X-Repo-Commit": branch["sha"], "ETag": f'"{_sha(payload)}"', "Accept-Ranges": "bytes"}
        status, body = 200, payload
        ranged = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if ranged:
            start, end = ranged.groups()
            first = int(start) if start else max(len(payload) - int(end), 0)
            last = min(int(end) if start and end else len(payload) - 1, len(payload) - 1)
            status, body = 206, payload[first : last + 1]
            headers["Content-Range"] = f"bytes {first}-{last}/{len(payload)}"
        if self.command == "GET" and filename.endswith(self.state.cut_suffix) and self._take_cut():
            return self._cut(status, body, headers)
        self._send(status, body, headers, content_type="application/octet-stream")

    def _take_cut(self) -> bool:
        with self.state.lock:
            if self.state.cut_downloads <= 0:
                return False
            self.state.cut_downloads -= 1
            return True

    def _cut(self, status: int, body: bytes, headers: dict) -> None:
        """Promise the whole body, send half of it, close the socket: a connection dropped mid-download."""
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


def add_dataset(state: HubState, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
    """A dataset repository ``repo_id`` holding ``files`` (path in the repo -> bytes) on ``main``; its commit."""
    sha = _sha(repr(sorted((name, _sha(payload)) for name, payload in files.items())).encode())
    with state.lock:
        state.datasets[repo_id] = {"private": private, "branches": {"main": {"files": dict(files), "sha": sha}}}
    return sha


def start_hub_server() -> tuple[ThreadingHTTPServer, HubState, str]:
    state = HubState()
    handler = type("BoundHubHandler", (HubHandler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state, f"http://127.0.0.1:{server.server_address[1]}"
