"""A loopback stand-in for the Hugging Face Hub's download endpoints, for the real client.

Serves folders registered as (repo_type, repo_id) at one fixed commit and records each request.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self):
        self.repos: dict[tuple[str, str], tuple[Path, str]] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo_id: str, folder: Path, repo_type: str = "model") -> str:
        sha = hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()
        self.repos[(repo_type, repo_id)] = (Path(folder), sha)
        return sha

    def close(self):
        self.server.shutdown()

    def _send(self, handler, status: int, data: bytes, headers: dict, body: bool):
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def _serve(self, handler, body: bool):
        path = unquote(urlparse(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        parts = path.strip("/").split("/")
        repo_type = "model"
        if parts[0] == "api":
            repo_type = parts[1].rstrip("s")
            repo_id = "/".join(parts[2:4])
            if (repo_type, repo_id) not in self.repos:
                return self._send(handler, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, body)
            folder, sha = self.repos[(repo_type, repo_id)]
            files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
            if len(parts) > 4 and parts[4] == "tree":
                info = [{"type": "file", "path": str(p.relative_to(folder)), "size": p.stat().st_size,
                         "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in files]
            else:
                info = {"id": repo_id, "sha": sha, "siblings": [{"rfilename": str(p.relative_to(folder))} for p in files], "private": False}
            return self._send(handler, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if parts[0] == "datasets":
            repo_type, parts = "dataset", parts[1:]
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if (repo_type, repo_id) not in self.repos or parts[2] != "resolve":
            return self._send(handler, 404, b"", {"X-Error-Code": "RepoNotFound"}, body)
        folder, sha = self.repos[(repo_type, repo_id)]
        file = folder / filename
        if revision not in ("main", sha):
            return self._send(handler, 404, b"", {"X-Error-Code": "RevisionNotFound"}, body)
        if not file.is_file():
            return self._send(handler, 404, b"", {"X-Error-Code": "EntryNotFound"}, body)
        data = file.read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        self._send(handler, 200, data, headers, body)
