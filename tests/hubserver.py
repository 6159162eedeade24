"""An HTTP server on 127.0.0.1 that answers file-metadata requests the way the Hugging Face hub does.

No hub can be reached from the test machines, so validation's hub check (``check_hub_id``) is pointed at
this server through ``HF_ENDPOINT`` (in-process: what it sets, ``tests/conftest.py::point_hub_at``), as
users point it at a mirror. It speaks only what ``huggingface_hub.get_hf_file_metadata`` reads: a HEAD (or GET) of
``/{org}/{name}/resolve/{revision}/{file}`` answered 200 with ``ETag``, ``X-Repo-Commit`` and
``Content-Length``, or an error status with the hub's ``X-Error-Code`` header (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``); any other path is a plain 404. Every request path is
recorded in ``requests`` (each GET's also in ``downloads``). A revision given as a local folder is served whole: a
HEAD answers each file's size and content hash, a GET sends its bytes (what ``hf_hub_download``, and so diffusers'
``from_pretrained``, reads).
"""

from __future__ import annotations

import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class HubServer:
    """``repos``: repo id -> {revision: set of file names, or a local folder whose files are served};
    ``gated``: repo ids that refuse anonymous access; ``broken``: repo ids answered with a 500 (a server error)."""

    def __init__(self, repos: dict[str, dict[str, set[str] | str]], gated: frozenset[str] = frozenset(),
                 broken: frozenset[str] = frozenset()):
        self.repos, self.gated, self.broken, self.requests = repos, gated, broken, []
        self.downloads: list[str] = []  # the GET requests among them
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self, body: bool = False) -> None:
                parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]  # a revision may hold "/"
                hub.requests.append("/" + "/".join(parts))
                if body:
                    hub.downloads.append("/" + "/".join(parts))
                status, headers = hub.answer(parts)
                data = hub.content(parts) if body and status == 200 else None
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if data:
                    self.wfile.write(data)

            def do_GET(self) -> None:
                self.do_HEAD(body=True)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def model_requests(self) -> list[str]:
        """The file requests among ``requests`` (huggingface_hub may also fetch its own registries)."""
        return [r for r in self.requests if "/resolve/" in r]

    def files(self, repo: str, revision: str) -> set[str]:
        """The file names of ``repo`` at ``revision`` (all the files under it, for a served folder)."""
        given = self.repos[repo][revision]
        if isinstance(given, str):
            return {os.path.relpath(os.path.join(root, n), given).replace(os.sep, "/")
                    for root, _, names in os.walk(given) for n in names}
        return given

    @staticmethod
    def commit(repo: str, revision: str) -> str:
        """The commit hash the server gives ``revision`` of ``repo`` (``X-Repo-Commit``)."""
        return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()

    def revision_of(self, repo: str, asked: str) -> str:
        """The revision a request names: itself, or the one whose commit hash it is (diffusers asks for a UNet's
        weights at the commit its config.json came from)."""
        return next((r for r in self.repos.get(repo, {}) if self.commit(repo, r) == asked), asked)

    def content(self, parts: list[str]) -> bytes | None:
        """The bytes of a served folder's file (None for a repo given as names only)."""
        repo = "/".join(parts[:2])
        folder = self.repos[repo][self.revision_of(repo, parts[3])]
        if not isinstance(folder, str):
            return None
        with open(os.path.join(folder, *parts[4:]), "rb") as fh:
            return fh.read()

    def answer(self, parts: list[str]) -> tuple[int, dict[str, str]]:
        """The status and headers for a request path, given as its unquoted "/"-separated parts."""
        if len(parts) < 5 or parts[2] != "resolve":
            return 404, {"Content-Length": "0"}
        repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        revision = self.revision_of(repo, revision)
        if repo in self.broken:
            return 500, {"Content-Length": "0"}
        if repo in self.gated:
            return 401, {"X-Error-Code": "GatedRepo", "Content-Length": "0"}
        if repo not in self.repos:
            return 401, {"X-Error-Code": "RepoNotFound", "Content-Length": "0"}
        if revision not in self.repos[repo]:
            return 404, {"X-Error-Code": "RevisionNotFound", "Content-Length": "0"}
        if name not in self.files(repo, revision):
            return 404, {"X-Error-Code": "EntryNotFound", "Content-Length": "0"}
        commit = self.commit(repo, revision)
        data = self.content(parts)
        if data is None:
            return 200, {"ETag": f'"{hashlib.sha1(name.encode()).hexdigest()}"', "X-Repo-Commit": commit,
                         "Content-Length": "0"}
        return 200, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": commit,
                     "Content-Length": str(len(data))}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
