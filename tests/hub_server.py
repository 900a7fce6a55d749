"""A small Hugging Face Hub of our own, standard library only, for testing pushes and pulls end to end.

    python tests/hub_server.py --port 8000 --root /tmp/hub --token secret --user alice
    HF_ENDPOINT=http://127.0.0.1:8000 HF_TOKEN=secret HF_HUB_DISABLE_XET=1 python conversion/push_to_hub.py DIR alice/m
    HF_ENDPOINT=http://127.0.0.1:8000 python -c "from transformers import AutoModelForCausalLM as A; \
        A.from_pretrained('alice/m', trust_remote_code=True)"

It answers the requests huggingface_hub (2.x, as installed) sends for model repos:

    POST /api/repos/create                                   create_repo (409 if it exists)
    GET  /api/whoami-v2                                      whoami
    GET  /api/models/{repo}[/revision/{rev}]                 model_info / repo_info (?blobs=1 adds sizes, LFS info)
    GET  /api/models/{repo}/tree/{rev}[/{path}]              list_repo_tree (?recursive=1)
    POST /api/models/{repo}/paths-info/{rev}                 get_paths_info
    GET  /api/models/{repo}/refs                             list_repo_refs
    GET  /api/models/{repo}/commits/{rev}                    list_repo_commits
    POST /api/models/{repo}/preupload/{rev}                  upload mode (lfs or regular) and remote oid per file
    POST /api/models/{repo}/commit/{rev}                     NDJSON: header, file (base64), lfsFile, deletedFile/Folder
    POST /api/validate-yaml                                  README.md metadata check (front matter present)
    POST /{repo}.git/info/lfs/objects/batch                  LFS batch API: upload actions only for missing objects
    PUT  /lfs/{repo}/{oid}?sig=...                           LFS upload (signed URL, no token, like a presigned URL)
    PUT  /lfs/{repo}/{oid}/{part}?sig=...  + POST completion  LFS multipart upload (objects above `multipart_chunk`)
    POST /{repo}.git/info/lfs/objects/verify                 LFS verify
    HEAD/GET /{repo}/resolve/{rev}/{path}                    file download: X-Repo-Commit, ETag (git oid, or sha256
                                                             for LFS files, also as X-Linked-Etag), Content-Length,
                                                             Range requests
Xet is not spoken: GET /api/models/{repo}/xet-write-token/{rev} answers 404, so clients must use the LFS protocol.

Storage under --root is content-addressed: objects/<sha256> per repo, each commit a JSON snapshot of the whole tree
(path -> sha256, size, git oid, lfs) named by the sha1 of its content, and refs.json (branch -> commit). So any
commit sha (full or a unique prefix of 7+) stays readable after later pushes. A new repo starts with a commit holding
.gitattributes, as on the Hub. Writes need `Authorization: Bearer <token>` of a known token, and the repo's namespace
must be the token's user; a wrong token gets 401 "Invalid credentials in Authorization header", as on the Hub.

Test knobs on HubServer: `log` (every request: method, path, status, bytes received, note), `drop_lfs_puts(start,
count)` (the server reads half the body of those LFS PUT attempts, counted from 1, then closes the socket without a
response), `drop_commits(n)` (the same for the next n commit POSTs, before anything is committed), `lfs_puts(oid)`
(completed uploads of an object), `in_flight` (requests being received: path, bytes so far); a commit's log entry
also lists its `operations` as (kind, path).
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Paths the Hub's default .gitattributes stores with LFS (the ones a model repo meets), and its size rule.
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".model", ".npy", ".npz",
    ".pkl", ".pickle", ".tar", ".gz", ".zip", ".zst", ".arrow", ".parquet", ".tflite", ".ot", ".joblib", ".7z",
)  # fmt: skip
LFS_MIN_SIZE = 10 * 2**20
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
BAD_TOKEN = "Invalid credentials in Authorization header"


def git_oid(data):
    """The git blob id of `data` (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path, size, sample=b""):
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample


class HubError(Exception):
    """An HTTP error answer: status, message, and the X-Error-Code huggingface_hub maps to its exception classes."""

    def __init__(self, status, message, code=None, headers=None, body=None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.body = status, message, code, headers or {}, body


class _Dropped(Exception):
    """The server closed the connection on purpose (a test knob)."""


class Store:
    """Repos on disk: <root>/<org>/<name>/{repo.json, refs.json, commits/<sha1>.json, objects/<sha256>}."""

    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    def path(self, repo):
        return self.root / repo

    def exists(self, repo):
        return (self.path(repo) / "repo.json").exists()

    def meta(self, repo):
        if not self.exists(repo):
            raise HubError(404, f"Repository {repo} not found", "RepoNotFound")
        return json.loads((self.path(repo) / "repo.json").read_text())

    def create(self, repo, private, url):
        with self.lock:
            if self.exists(repo):
                raise HubError(409, "You already created this model repo", body={"url": url})
            d = self.path(repo)
            (d / "commits").mkdir(parents=True, exist_ok=True)
            (d / "objects").mkdir(exist_ok=True)
            (d / "refs.json").write_text("{}")
            sha = self.put_object(repo, GITATTRIBUTES)
            tree = {".gitattributes": _entry(GITATTRIBUTES, sha, lfs=False)}
            self.commit(repo, "main", tree, "initial commit", "", parent=None)
            # written last: a repo exists once it has its first commit
            _atomic_write(d / "repo.json", json.dumps({"private": bool(private), "created": _now()}).encode())

    def refs(self, repo):
        return json.loads((self.path(repo) / "refs.json").read_text())

    def resolve(self, repo, rev):
        """A branch name, refs/heads/<branch>, or a commit sha (full or a unique prefix of 7+) -> commit sha."""
        self.meta(repo)
        rev = unquote(rev)
        rev = rev[len("refs/heads/") :] if rev.startswith("refs/heads/") else rev
        refs = self.refs(repo)
        if rev in refs:
            return refs[rev]
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            hits = [p.stem for p in (self.path(repo) / "commits").glob(f"{rev}*.json")]
            if len(hits) == 1:
                return hits[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def load_commit(self, repo, sha):
        return json.loads((self.path(repo) / "commits" / f"{sha}.json").read_text())

    def tree(self, repo, rev):
        sha = self.resolve(repo, rev)
        return sha, self.load_commit(repo, sha)["tree"]

    def object_path(self, repo, sha256):
        return self.path(repo) / "objects" / sha256

    def has_object(self, repo, sha256, size):
        p = self.object_path(repo, sha256)
        return p.exists() and p.stat().st_size == size

    def put_object(self, repo, data):
        sha = hashlib.sha256(data).hexdigest()
        if not self.object_path(repo, sha).exists():
            _atomic_write(self.object_path(repo, sha), data)
        return sha

    def commit(self, repo, branch, tree, summary, description, parent):
        """Record a snapshot of `tree` on `branch`; its id is the sha1 of its content (parent, time and all)."""
        with self.lock:
            body = {"parent": parent, "summary": summary, "description": description, "date": _now(), "tree": tree}
            raw = json.dumps(body, sort_keys=True).encode()
            sha = hashlib.sha1(raw).hexdigest()
            _atomic_write(self.path(repo) / "commits" / f"{sha}.json", raw)
            refs = self.refs(repo)
            refs[branch] = sha
            _atomic_write(self.path(repo) / "refs.json", json.dumps(refs).encode())
            return sha

    def history(self, repo, sha):
        out = []
        while sha is not None:
            c = self.load_commit(repo, sha)
            out.append((sha, c))
            sha = c["parent"]
        return out


def _entry(data_or_size, sha256, lfs, oid=None):
    size = data_or_size if isinstance(data_or_size, int) else len(data_or_size)
    if oid is None:
        oid = git_oid(data_or_size) if not lfs else git_oid(_pointer(sha256, size))
    return {"sha256": sha256, "size": size, "lfs": lfs, "oid": oid}


def _pointer(sha256, size):
    """The git-lfs pointer file of an LFS object (the git blob a repo holds for it)."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _atomic_write(path, data):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class HubServer(ThreadingHTTPServer):
    """The server; use as a context manager (serves on a thread) or call serve_forever(). `url` is its endpoint."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root, host="127.0.0.1", port=0, tokens=None, multipart_chunk=None):
        super().__init__((host, port), Handler)
        self.store = Store(root)
        self.tokens = dict(tokens or {})  # token -> user name
        self.multipart_chunk = multipart_chunk  # LFS objects larger than this are uploaded in parts of this size
        self.secret = secrets.token_bytes(16)  # signs upload URLs
        self.url = f"http://{host}:{self.server_address[1]}"
        self.log = []
        self.in_flight = {}  # request being received -> (path, bytes so far)
        self._lock = threading.Lock()
        self._put_count = 0
        self._drop_puts = set()
        self._drop_puts_from = None
        self._drop_commits = 0
        self._thread = None

    # -- test knobs -------------------------------------------------------------------------------------------------
    def drop_lfs_puts(self, start, count=1):
        """Drop LFS PUT attempts number start .. start + count - 1 (1-based, parts included); count=None: all from
        start on, until clear_drops()."""
        with self._lock:
            if count is None:
                self._drop_puts_from = start
            else:
                self._drop_puts.update(range(start, start + count))

    def drop_commits(self, n=1):
        with self._lock:
            self._drop_commits += n

    def clear_drops(self):
        with self._lock:
            self._drop_puts, self._drop_puts_from, self._drop_commits = set(), None, 0

    def _should_drop_put(self):
        with self._lock:
            self._put_count += 1
            n = self._put_count
            return n in self._drop_puts or (self._drop_puts_from is not None and n >= self._drop_puts_from)

    def _should_drop_commit(self):
        with self._lock:
            if self._drop_commits > 0:
                self._drop_commits -= 1
                return True
            return False

    def lfs_puts(self, oid=None):
        """Log entries of LFS uploads that completed (single PUT or multipart completion), optionally for one oid."""
        return [e for e in self.log if e["note"].startswith("lfs stored") and (oid is None or oid in e["path"])]

    def sign(self, repo, oid):
        return hmac.new(self.secret, f"{repo}/{oid}".encode(), "sha256").hexdigest()

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def __enter__(self):
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()
        self._thread.join()

    def handle_error(self, request, client_address):
        pass  # a client that went away; the request log tells what happened


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, *args):
        pass

    # -- plumbing ---------------------------------------------------------------------------------------------------
    def _route(self, method):
        self._received, self._note, self._status, self._body_read, self._extra = 0, "", None, False, {}
        url = urlsplit(self.path)
        self._query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            try:
                self._dispatch(method, url.path)
            except HubError:
                self._drain()
                raise
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json({"error": err.message, **(err.body or {})}, err.status, headers)
        except _Dropped:
            self._status = "dropped"
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        finally:
            self.server.log.append(
                {
                    "method": method,
                    "path": url.path,
                    "status": self._status,
                    "received": self._received,
                    "note": self._note,
                    "time": time.time(),
                    **self._extra,
                }
            )
            self.server.in_flight.pop(id(self), None)

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def _chunks(self, limit=None):
        """The request body in pieces (Content-Length or chunked transfer encoding); stops after `limit` bytes."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                n = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                data = self.rfile.read(n)
                self.rfile.readline()
                self._received += len(data)
                self.server.in_flight[id(self)] = (self.path, self._received)
                yield data
                if limit is not None and self._received >= limit:
                    return
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0:
                data = self.rfile.read(min(left, 1 << 20))
                if not data:
                    return
                left -= len(data)
                self._received += len(data)
                self.server.in_flight[id(self)] = (self.path, self._received)
                yield data
                if limit is not None and self._received >= limit:
                    return

    def _body(self):
        return b"".join(self._chunks())

    def _drain(self):
        if not getattr(self, "_body_read", False):
            for _ in self._chunks():
                pass
        self._body_read = True

    def _json_body(self):
        self._body_read = True
        raw = self._body()
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"invalid JSON body: {err}") from None

    def _send(self, status, body=b"", headers=None, content_type="application/json"):
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status=200, headers=None, content_type="application/json"):
        self._send(status, json.dumps(obj).encode(), headers, content_type)

    def _user(self, required):
        """The user of the request's token; None for anonymous reads; 401 for a bad token or a write without one."""
        auth = self.headers.get("Authorization", "")
        if not auth:
            if required:
                raise HubError(401, "You must be authenticated to do this: pass a token (Authorization: Bearer)")
            return None
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        if token not in self.server.tokens:
            raise HubError(401, BAD_TOKEN)
        return self.server.tokens[token]

    def _can_write(self, repo):
        user = self._user(required=True)
        if repo.split("/")[0] != user:
            raise HubError(403, f"You don't have the rights to write to {repo} (your token is {user}'s)")
        return user

    def _can_read(self, repo):
        meta = self.server.store.meta(repo)
        user = self._user(required=False)
        if meta["private"] and user != repo.split("/")[0]:
            raise HubError(404, f"Repository {repo} not found", "RepoNotFound")

    # -- routes -----------------------------------------------------------------------------------------------------
    def _dispatch(self, method, path):
        m = lambda pattern: re.fullmatch(pattern, path)  # noqa: E731
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo()
        if method == "GET" and path == "/api/whoami-v2":
            user = self._user(required=True)
            return self._json({"type": "user", "name": user, "orgs": [], "auth": {"accessToken": {"role": "write"}}})
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml()
        if r := m(rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?"):
            if method == "GET":
                return self._model_info(r["repo"], r["rev"] or "main")
        if (r := m(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?P<sub>/.*)?")) and method == "GET":
            return self._tree(r["repo"], r["rev"], unquote((r["sub"] or "/")[1:]))
        if (r := m(rf"/api/models/{REPO}/paths-info/(?P<rev>[^/]+)")) and method == "POST":
            return self._paths_info(r["repo"], r["rev"])
        if (r := m(rf"/api/models/{REPO}/refs")) and method == "GET":
            return self._refs(r["repo"])
        if (r := m(rf"/api/models/{REPO}/commits/(?P<rev>[^/]+)")) and method == "GET":
            return self._commits(r["repo"], r["rev"])
        if (r := m(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)")) and method == "POST":
            return self._preupload(r["repo"], r["rev"])
        if (r := m(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)")) and method == "POST":
            return self._commit(r["repo"], r["rev"])
        if m(rf"/api/models/{REPO}/xet-(read|write)-token/.*"):
            raise HubError(404, "this Hub does not speak Xet: upload with the LFS protocol")
        if (r := m(rf"/{REPO}\.git/info/lfs/objects/batch")) and method == "POST":
            return self._lfs_batch(r["repo"])
        if (r := m(rf"/{REPO}\.git/info/lfs/objects/verify")) and method == "POST":
            return self._lfs_verify(r["repo"])
        if r := m(rf"/lfs/{REPO}/(?P<oid>[0-9a-f]{{64}})(?:/(?P<part>\d+))?"):
            if method == "PUT":
                return self._lfs_put(r["repo"], r["oid"], r["part"])
            if method == "POST" and r["part"] is None:
                return self._lfs_complete(r["repo"], r["oid"])
        if (r := m(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)")) and method in ("GET", "HEAD"):
            return self._resolve(r["repo"], r["rev"], unquote(r["file"]))
        raise HubError(404, f"no route for {method} {path} on this test Hub")

    def _create_repo(self):
        body = self._json_body()
        if body.get("type") not in (None, "model"):
            raise HubError(400, f"this test Hub holds model repos only, not {body.get('type')!r}")
        user = self._user(required=True)
        repo = f"{body.get('organization') or user}/{body['name']}"
        if not re.fullmatch(REPO, repo):
            raise HubError(400, f"invalid repo id {repo!r}")
        self._can_write(repo)
        private = body.get("private", body.get("visibility") == "private")
        self.server.store.create(repo, private, f"{self.server.url}/{repo}")
        self._note = f"created {repo}"
        self._json({"url": f"{self.server.url}/{repo}", "name": repo, "id": repo})

    def _validate_yaml(self):
        content = self._json_body().get("content", "")
        errors = []
        if content.startswith("---") and content.find("\n---", 3) < 0:
            errors.append({"message": "the YAML front matter is not closed by a '---' line"})
        if errors:
            return self._json({"errors": errors, "warnings": []}, 400)
        self._json({"errors": [], "warnings": []})

    def _model_info(self, repo, rev):
        self._can_read(repo)
        sha, tree = self.server.store.tree(repo, rev)
        blobs = self._query.get("blobs") in ("1", "true", "True")
        siblings = []
        for p, e in sorted(tree.items()):
            s = {"rfilename": p}
            if blobs:
                s.update(size=e["size"], blobId=e["oid"])
                if e["lfs"]:
                    s["lfs"] = {"sha256": e["sha256"], "size": e["size"], "pointerSize": len(_pointer(e["sha256"], 0))}
            siblings.append(s)
        commit = self.server.store.load_commit(repo, sha)
        self._json(
            {
                "_id": repo,
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": sha,
                "lastModified": commit["date"],
                "createdAt": self.server.store.meta(repo)["created"],
                "private": self.server.store.meta(repo)["private"],
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    def _file_info(self, path, e):
        d = {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}
        if e["lfs"]:
            d["lfs"] = {"oid": e["sha256"], "size": e["size"], "pointerSize": len(_pointer(e["sha256"], e["size"]))}
        return d

    def _folder_info(self, path, tree):
        inner = sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(path + "/"))
        oid = hashlib.sha1(json.dumps(inner).encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": path}

    def _tree(self, repo, rev, sub):
        self._can_read(repo)
        _, tree = self.server.store.tree(repo, rev)
        recursive = self._query.get("recursive") in ("1", "true", "True")
        prefix = f"{sub.rstrip('/')}/" if sub else ""
        if sub and sub in tree:
            raise HubError(400, f"{sub} is a file, not a folder")
        out, folders = [], set()
        for p in sorted(tree):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :].split("/")
            for i in range(1, len(rest)):
                folder = prefix + "/".join(rest[:i])
                if (recursive or i == 1) and folder not in folders:
                    folders.add(folder)
                    out.append(self._folder_info(folder, tree))
            if recursive or len(rest) == 1:
                out.append(self._file_info(p, tree[p]))
        if sub and not out:
            raise HubError(404, f"{sub} does not exist at {rev}", "EntryNotFound")
        self._json(out)

    def _paths_info(self, repo, rev):
        self._can_read(repo)
        _, tree = self.server.store.tree(repo, rev)
        self._body_read = True
        raw = self._body().decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(raw or "{}").get("paths", [])
        else:
            paths = parse_qs(raw).get("paths", [])
        out = []
        for p in paths:
            p = p.strip("/")
            if p in tree:
                out.append(self._file_info(p, tree[p]))
            elif any(q.startswith(p + "/") for q in tree):
                out.append(self._folder_info(p, tree))
        self._json(out)

    def _refs(self, repo):
        self._can_read(repo)
        refs = self.server.store.refs(repo)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in sorted(refs.items())]
        self._json({"branches": branches, "tags": [], "converts": []})

    def _commits(self, repo, rev):
        self._can_read(repo)
        sha = self.server.store.resolve(repo, rev)
        out = [
            {"id": s, "title": c["summary"], "message": c["description"], "date": c["date"], "authors": []}
            for s, c in self.server.store.history(repo, sha)
        ]
        self._json(out)

    def _preupload(self, repo, rev):
        self._can_write(repo)
        body = self._json_body()
        _, tree = self.server.store.tree(repo, rev)
        files = []
        for f in body.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = is_lfs(f["path"], int(f["size"]), sample)
            e = tree.get(f["path"])
            remote = None if e is None else (e["sha256"] if e["lfs"] else e["oid"])
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": remote})  # fmt: skip
        self._json({"files": files, "commitOid": self.server.store.resolve(repo, rev)})

    def _commit(self, repo, rev):
        self._can_write(repo)
        store = self.server.store
        branch = unquote(rev)
        if branch not in store.refs(repo):
            raise HubError(404, f"Invalid rev id: {branch} (commits go to an existing branch)", "RevisionNotFound")
        if self.server._should_drop_commit():
            for _ in self._chunks(limit=max(1, int(self.headers.get("Content-Length") or 2) // 2)):
                pass
            self._note = "commit dropped"
            raise _Dropped()
        self._body_read = True
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        with store.lock:
            parent, tree = store.tree(repo, branch)
            want = header.get("parentCommit")
            if want and not parent.startswith(want):
                raise HubError(412, f"A commit has happened since {want}: {branch} is at {parent}")
            tree = dict(tree)
            self._extra["operations"] = [(item["key"], item["value"]["path"]) for item in lines[1:]]
            for item in lines[1:]:
                key, v = item["key"], item["value"]
                path = v["path"].strip("/")
                if key == "file":
                    data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                    tree[path] = _entry(data, store.put_object(repo, data), lfs=False)
                elif key == "lfsFile":
                    oid, obj = v["oid"], store.object_path(repo, v["oid"])
                    size = v.get("size", obj.stat().st_size if obj.exists() else -1)
                    if not store.has_object(repo, oid, size):
                        raise HubError(422, f"LFS object {oid} of {path} was never uploaded to {repo}")
                    tree[path] = _entry(size, oid, lfs=True)
                elif key == "deletedFile":
                    if path not in tree:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del tree[path]
                elif key == "deletedFolder":
                    tree = {p: e for p, e in tree.items() if not p.startswith(path + "/")}
                else:
                    raise HubError(400, f"unknown commit operation {key!r}")
            sha = store.commit(repo, branch, tree, header.get("summary", ""), header.get("description", ""), parent)
        self._note = f"commit {sha} ({len(lines) - 1} operations)"
        self._json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.server.url}/{repo}/commit/{sha}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }  # fmt: skip
        )

    def _lfs_batch(self, repo):
        self._can_write(repo)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "this test Hub answers LFS uploads only (downloads go through /resolve)")
        store, base, chunk = self.server.store, self.server.url, self.server.multipart_chunk
        objects = []
        for o in body.get("objects", []):
            oid, size = o["oid"], int(o["size"])
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                entry["error"] = {"code": 422, "message": f"invalid oid {oid!r}"}
            elif not store.has_object(repo, oid, size):  # already there: no actions, the client skips it
                href = f"{base}/lfs/{repo}/{oid}?sig={self.server.sign(repo, oid)}&size={size}"
                upload = {"href": href}
                if chunk is not None and size > chunk:
                    n = -(-size // chunk)
                    upload["header"] = {"chunk_size": str(chunk)}
                    for i in range(1, n + 1):
                        upload["header"][f"{i:05d}"] = f"{base}/lfs/{repo}/{oid}/{i}?sig={self.server.sign(repo, oid)}"
                verify = {"href": f"{base}/{repo}.git/info/lfs/objects/verify"}
                entry["actions"] = {"upload": upload, "verify": verify}
            objects.append(entry)
        self._note = f"{sum('actions' in o for o in objects)} of {len(objects)} objects to upload"
        self._json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _check_sig(self, repo, oid):
        if not hmac.compare_digest(self._query.get("sig", ""), self.server.sign(repo, oid)):
            raise HubError(403, "the upload URL's signature is invalid")

    def _lfs_put(self, repo, oid, part):
        self._check_sig(repo, oid)
        store = self.server.store
        if self.server._should_drop_put():
            size = int(self.headers.get("Content-Length") or self._query.get("size") or 2)
            for _ in self._chunks(limit=max(1, size // 2)):
                pass
            self._note = f"lfs put dropped {oid}" + (f" part {part}" if part else "")
            raise _Dropped()
        uploads = store.path(repo) / "uploads"
        uploads.mkdir(exist_ok=True)
        target = uploads / (f"{oid}.{int(part):05d}" if part else oid)
        fd, tmp = tempfile.mkstemp(dir=uploads, prefix=".put-")
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            for data in self._chunks():
                f.write(data)
                h.update(data)
        self._body_read = True
        if part:
            os.replace(tmp, target)
            self._note = f"lfs part {part} of {oid}"
            return self._send(200, headers={"ETag": f'"{h.hexdigest()}"'})
        if h.hexdigest() != oid:
            os.unlink(tmp)
            raise HubError(400, f"the uploaded content's sha256 is {h.hexdigest()}, not {oid}")
        os.replace(tmp, store.object_path(repo, oid))
        self._note = f"lfs stored {oid}"
        self._send(200)

    def _lfs_complete(self, repo, oid):
        self._check_sig(repo, oid)
        store = self.server.store
        body = self._json_body()
        uploads = store.path(repo) / "uploads"
        parts = sorted(body.get("parts", []), key=lambda p: p["partNumber"])
        fd, tmp = tempfile.mkstemp(dir=uploads, prefix=".join-")
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                path = uploads / f"{oid}.{p['partNumber']:05d}"
                with open(path, "rb") as f:
                    data = f.read()
                if f'"{hashlib.sha256(data).hexdigest()}"' != p["etag"]:
                    os.unlink(tmp)
                    raise HubError(400, f"part {p['partNumber']} of {oid}: etag mismatch")
                out.write(data)
                h.update(data)
        if h.hexdigest() != oid:
            os.unlink(tmp)
            raise HubError(400, f"the joined parts' sha256 is {h.hexdigest()}, not {oid}")
        os.replace(tmp, store.object_path(repo, oid))
        for p in parts:
            (uploads / f"{oid}.{p['partNumber']:05d}").unlink(missing_ok=True)
        self._note = f"lfs stored {oid} from {len(parts)} parts"
        self._json({"success": True})

    def _lfs_verify(self, repo):
        self._can_write(repo)
        body = self._json_body()
        if not self.server.store.has_object(repo, body["oid"], int(body["size"])):
            raise HubError(404, f"LFS object {body['oid']} of size {body['size']} is not stored")
        self._json({"success": True})

    def _resolve(self, repo, rev, path):
        self._can_read(repo)
        store = self.server.store
        sha, tree = store.tree(repo, rev)
        e = tree.get(path)
        if e is None:
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound", {"X-Repo-Commit": sha})
        etag = f'"{e["sha256"] if e["lfs"] else e["oid"]}"'
        headers = {"X-Repo-Commit": sha, "ETag": etag, "Accept-Ranges": "bytes"}
        if e["lfs"]:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(e["size"])})
        start, status = 0, 200
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        end = e["size"]
        if rng:
            start, status = int(rng[1]), 206
            end = min(end, int(rng[2]) + 1) if rng[2] else end
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{e['size']}"
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "GET":
            with open(store.object_path(repo, e["sha256"]), "rb") as f:
                f.seek(start)
                shutil.copyfileobj(_Limited(f, end - start), self.wfile, 1 << 20)


class _Limited:
    def __init__(self, f, n):
        self.f, self.n = f, n

    def read(self, size=-1):
        size = self.n if size < 0 else min(size, self.n)
        data = self.f.read(size)
        self.n -= len(data)
        return data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="folder that holds the repos (created if missing)")
    ap.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: %(default)s)")
    ap.add_argument("--token", default="hub-test-token", help="the write token (default: %(default)s)")
    ap.add_argument("--user", default="user", help="the token's user name = the namespace it may write to")
    ap.add_argument("--multipart-chunk", type=int, help="upload LFS objects above this many bytes in parts")
    args = ap.parse_args(argv)
    server = HubServer(args.root, args.host, args.port, {args.token: args.user}, args.multipart_chunk)
    print(f"serving {args.root} at {server.url} (token {args.token!r} writes to {args.user}/...)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
