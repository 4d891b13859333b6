"""A loopback stand-in for the Hugging Face Hub, for the real huggingface_hub client.

Downloads: folders registered as (repo_type, repo_id) at one fixed commit.
Uploads: repo creation, branches, preupload, LFS batch + PUT, NDJSON commits; each commit's
files (path -> bytes) are kept in `commits`. Every request is recorded as "METHOD /path",
with its path and lower-cased headers in `headers`. `fail_uploads` makes that many LFS PUTs answer 500.
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
        self.headers: list[dict] = []
        self.created: dict[str, dict] = {}
        self.branches: dict[str, set[str]] = {}
        self.commits: list[dict] = []
        self.lfs: dict[str, bytes] = {}
        self.fail_uploads = 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

            def do_POST(self):
                hub._write(self)

            def do_PUT(self):
                hub._write(self)

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
            if repo_id in self.created and len(parts) > 4 and parts[4] == "tree":
                files = self._files(repo_id, unquote("/".join(parts[5:])) or "main")
                listing = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()} for p, b in sorted(files.items())]
                return self._send(handler, 200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, body)
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

    def _validate_card(self, handler, content: str) -> None:
        """What the Hub checks in a card's front matter: YAML, and a model-index it can read."""
        import yaml
        from huggingface_hub.repocard_data import model_index_to_eval_results

        try:
            meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
            if "model-index" in meta:
                model_index_to_eval_results(meta["model-index"])
        except Exception as exc:  # any failure is the card's fault here
            return self._json(handler, 400, {"error": f"invalid card metadata: {exc}"})
        return self._json(handler, 200, {"errors": [], "warnings": []})

    def _json(self, handler, status: int, payload) -> None:
        self._send(handler, status, json.dumps(payload).encode(), {"Content-Type": "application/json"}, True)

    def _files(self, repo_id: str, branch: str) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        for commit in self.commits:
            if commit["repo_id"] == repo_id and commit["branch"] == branch:
                files.update(commit["files"])
                for path in commit["deleted"]:
                    files.pop(path, None)
        return files

    def _write(self, handler) -> None:
        import base64

        path = unquote(urlparse(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        self.headers.append({"path": path, **{k.lower(): v for k, v in handler.headers.items()}})
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        parts = path.strip("/").split("/")
        if path == "/api/validate-yaml":
            return self._validate_card(handler, json.loads(body)["content"])
        if path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
            if repo_id in self.created:
                return self._json(handler, 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"})
            # older clients send "private", newer ones "visibility"
            request["private"] = request.get("private", request.get("visibility") == "private")
            self.created[repo_id] = request
            self.branches[repo_id] = {"main"}
            return self._json(handler, 200, {"url": f"{self.endpoint}/{repo_id}"})
        if parts[0] == "lfs-upload":
            if self.fail_uploads:
                self.fail_uploads -= 1
                return self._json(handler, 500, {"error": "storage unavailable"})
            self.lfs[parts[1]] = body
            return self._send(handler, 200, b"", {}, True)
        if len(parts) >= 4 and parts[0] == "api":
            repo_id, action = "/".join(parts[2:4]), parts[4]
            revision = unquote("/".join(parts[5:]))
            if repo_id not in self.created:
                return self._send(handler, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, True)
            if action == "branch":
                if revision in self.branches[repo_id]:
                    return self._json(handler, 409, {"error": "branch exists"})
                self.branches[repo_id].add(revision)
                return self._json(handler, 200, {})
            if action == "preupload":
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular", "shouldIgnore": False} for f in files]
                return self._json(handler, 200, {"files": modes, "commitOid": "0" * 40})
            if action == "commit":
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                commit = {"repo_id": repo_id, "branch": revision, "files": {}, "deleted": [], "create_pr": "create_pr=1" in handler.path}
                for line in lines:
                    value = line["value"]
                    if line["key"] == "header":
                        commit["message"] = value["summary"]
                    elif line["key"] == "file":
                        commit["files"][value["path"]] = base64.b64decode(value["content"])
                    elif line["key"] == "lfsFile":
                        commit["files"][value["path"]] = self.lfs[value["oid"]]
                    elif line["key"] in ("deletedFile", "deletedFolder"):
                        commit["deleted"].append(value["path"])
                self.commits.append(commit)
                oid = hashlib.sha1(json.dumps(sorted(commit["files"])).encode() + str(len(self.commits)).encode()).hexdigest()
                pr = f"{self.endpoint}/{repo_id}/discussions/{len(self.commits)}" if commit["create_pr"] else None
                return self._json(handler, 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr})
        if path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(body)["objects"]
            actions = [{"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"{self.endpoint}/lfs-upload/{o['oid']}"}}} for o in objects]
            return self._json(handler, 200, {"transfer": "basic", "objects": actions})
        self._send(handler, 404, b"", {"X-Error-Code": "EntryNotFound"}, True)
