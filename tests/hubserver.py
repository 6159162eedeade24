"""An HTTP server on 127.0.0.1 that answers file-metadata requests the way the Hugging Face hub does.

No hub can be reached from the test machines, so validation's hub check (``check_hub_id``) is pointed at
this server through ``HF_ENDPOINT`` (in-process: what it sets, ``tests/conftest.py::point_hub_at``), as
users point it at a mirror. It speaks only what ``huggingface_hub.get_hf_file_metadata`` reads: a HEAD (or GET) of
``/{org}/{name}/resolve/{revision}/{file}`` answered 200 with ``ETag``, ``X-Repo-Commit`` and
``Content-Length``, or an error status with the hub's ``X-Error-Code`` header (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``); any other path is a plain 404. Every request path is
recorded in ``requests``.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class HubServer:
    """``repos``: repo id -> {revision: set of file names}; ``gated``: repo ids that refuse anonymous access;
    ``broken``: repo ids answered with a 500 (a server error)."""

    def __init__(self, repos: dict[str, dict[str, set[str]]], gated: frozenset[str] = frozenset(),
                 broken: frozenset[str] = frozenset()):
        self.repos, self.gated, self.broken, self.requests = repos, gated, broken, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]  # a revision may hold "/"
                hub.requests.append("/" + "/".join(parts))
                status, headers = hub.answer(parts)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()

            do_GET = do_HEAD

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def model_requests(self) -> list[str]:
        """The file requests among ``requests`` (huggingface_hub may also fetch its own registries)."""
        return [r for r in self.requests if "/resolve/" in r]

    def answer(self, parts: list[str]) -> tuple[int, dict[str, str]]:
        """The status and headers for a request path, given as its unquoted "/"-separated parts."""
        if len(parts) < 5 or parts[2] != "resolve":
            return 404, {"Content-Length": "0"}
        repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo in self.broken:
            return 500, {"Content-Length": "0"}
        if repo in self.gated:
            return 401, {"X-Error-Code": "GatedRepo", "Content-Length": "0"}
        if repo not in self.repos:
            return 401, {"X-Error-Code": "RepoNotFound", "Content-Length": "0"}
        if revision not in self.repos[repo]:
            return 404, {"X-Error-Code": "RevisionNotFound", "Content-Length": "0"}
        if name not in self.repos[repo][revision]:
            return 404, {"X-Error-Code": "EntryNotFound", "Content-Length": "0"}
        commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
        return 200, {"ETag": f'"{hashlib.sha1(name.encode()).hexdigest()}"', "X-Repo-Commit": commit,
                     "Content-Length": "0"}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
