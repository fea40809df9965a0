"""convert.source: SOURCE -> local folder, against a local stand-in of the Hub.

The stand-in serves the endpoints huggingface_hub 2.4's snapshot_download
calls: GET /api/models/{repo}/revision/{rev} (repo_info: the commit sha),
GET /api/models/{repo}/tree/{sha}?recursive=true (the file list), then per
file HEAD and GET /{repo}/resolve/{sha}/{path} (X-Repo-Commit, ETag,
Content-Length; Range -> 206). Errors carry the Hub's X-Error-Code header.
resolve_source runs in a subprocess with HF_ENDPOINT pointing at it, as a
user's process would (huggingface_hub reads its environment at import).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from convert.source import SourceError, is_repo_id, resolve_source
from convert.synthetic import make_config, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REPO = "zai-org/GLM-Tiny"
SHA = "0123456789abcdef0123456789abcdef01234567"
SHARD = "model-00001-of-00002.safetensors"
UNWANTED = {"original/consolidated.00.pth": b"torch pickle" * 100, "pytorch_model.bin": b"bin" * 100,
            "original/model.safetensors": b"not for us", "extra.safetensors": b"not named by the index"}


# -- the stand-in Hub ---------------------------------------------------------------

class Hub:
    """repos: {repo id: {path: bytes}}; gated: {repo id: token}; faults: {path: [action]},
    one action taken per GET of that file ("drop": half the body, then close; an int: that status)."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated: dict[str, str] | None = None):
        self.repos, self.gated = repos, gated or {}
        self.faults: dict[str, list] = {}
        self.log: list[tuple[str, str, dict]] = []  # (method, path, headers)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def gets(self, repo=REPO) -> list[tuple[str, dict]]:
        """(file, headers) of every GET of file content."""
        pre = f"/{repo}/resolve/"
        return [(p[len(pre):].split("/", 1)[1], h) for m, p, h in self.log if m == "GET" and p.startswith(pre)]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: no keep-alive to get wrong

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _send(self, status, headers=(), body=b"", send_body=True):
                self.send_response(status)
                for k, v in dict(headers).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def _error(self, status, code, message):
                self._send(status, {"X-Error-Code": code, "X-Error-Message": message},
                           json.dumps({"error": message}).encode())

            def _json(self, obj):
                self._send(200, {"Content-Type": "application/json"}, json.dumps(obj).encode())

            def _serve(self, body: bool):
                path = unquote(urlsplit(self.path).path)
                hub.log.append((self.command, path, {k.lower(): v for k, v in self.headers.items()}))
                parts = path.strip("/").split("/")
                if parts[0] == "api" and len(parts) >= 6 and parts[1] == "models":
                    repo, kind, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
                    files = hub.repos.get(repo)
                    if files is None:
                        return self._error(404, "RepoNotFound", "Repository not found")
                    if rev not in ("main", SHA):
                        return self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
                    if kind == "revision":
                        return self._json({"id": repo, "sha": SHA, "private": False,
                                           "gated": "manual" if repo in hub.gated else False,
                                           "siblings": [{"rfilename": f} for f in sorted(files)]})
                    if kind == "tree":
                        return self._json(_tree(files))
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, rev, name = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
                    files = hub.repos.get(repo)
                    if files is None:
                        return self._error(404, "RepoNotFound", "Repository not found")
                    if rev not in ("main", SHA):
                        return self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
                    token = hub.gated.get(repo)
                    if token and self.headers.get("Authorization") != f"Bearer {token}":
                        return self._error(401, "GatedRepo", f"Access to model {repo} is restricted.")
                    if name not in files:
                        return self._error(404, "EntryNotFound", f"{name} does not exist")
                    return self._file(files[name], name, body)
                self._error(404, "RepoNotFound", "Not found")

            def _file(self, data: bytes, name: str, body: bool):
                headers = {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                           "Accept-Ranges": "bytes"}
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                fault = hub.faults.get(name, []).pop(0) if body and hub.faults.get(name) else None
                if isinstance(fault, int):
                    return self._error(fault, "ServiceUnavailable", "try again later")
                part = data[start:]
                if fault == "drop":  # promise the whole body, send half, hang up
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(part)))
                    self.end_headers()
                    self.wfile.write(part[: len(part) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self._send(status, headers, part, send_body=body)

        return Handler


def _tree(files: dict[str, bytes]) -> list[dict]:
    """The recursive /tree listing: folders and files, LFS metadata on weights."""
    out = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d}
           for d in sorted({f.rsplit("/", 1)[0] for f in files if "/" in f})]
    for f, data in sorted(files.items()):
        entry = {"type": "file", "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                 "size": len(data), "path": f}
        if f.endswith((".safetensors", ".bin", ".pth")):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        out.append(entry)
    return out


# -- running resolve_source as a user's process would ---------------------------------

_CHILD = """
import json, sys
from convert.source import SourceError, resolve_source
try:
    path, info = resolve_source(*json.loads(sys.argv[1]))
    print(json.dumps({"path": str(path), "info": info}))
except SourceError as e:
    print(json.dumps({"error": str(e)}))
"""


def resolve(hub: Hub, tmp: Path, source: str, revision=None, token=None, env: dict | None = None) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.upper().startswith(("HF_", "HUGGING")) and "proxy" not in k.lower()}
    clean.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
                 HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(ROOT), **(env or {}))
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([source, revision, token, str(tmp / "cache")])],
                       cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict[str, bytes]:
    folder = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "c", make_config("air-tiny"))
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def hub(checkpoint):
    h = Hub({REPO: {**checkpoint, **UNWANTED}, "zai-org/Gated": dict(checkpoint)}, gated={"zai-org/Gated": "hf_s3cr3t"})
    yield h
    h.close()


def _same_files(folder: Path, files: dict[str, bytes]) -> None:
    got = {p.name for p in folder.iterdir()}
    assert got == set(files)
    for name, data in files.items():
        assert (folder / name).read_bytes() == data, name


# -- the tests -------------------------------------------------------------------------

def test_repo_id_downloads_only_what_convert_needs(hub, checkpoint, tmp_path):
    r = resolve(hub, tmp_path, REPO)
    assert r["info"] == {"repo": REPO, "revision": SHA}
    path = Path(r["path"])
    assert path.is_relative_to(tmp_path / "cache")
    _same_files(path, checkpoint)
    fetched = [f for f, _ in hub.gets()]
    assert sorted(fetched) == sorted(checkpoint)  # each needed file once, nothing of UNWANTED


# Every file of a huggingface_hub cache snapshot is a symlink into ../../blobs/.
def test_downloaded_snapshot_converts_and_loads(hub, tmp_path):
    import glm_mlx
    from convert.convert import MANIFEST, convert

    r = resolve(hub, tmp_path, REPO)
    out = convert(r["path"], tmp_path / "out", "none", source_info=r["info"])
    manifest = json.loads((out / MANIFEST).read_text())
    assert {k: manifest["source"][k] for k in ("kind", "repo", "revision")} == {"kind": "hf", "repo": REPO,
                                                                               "revision": SHA}
    model, _ = glm_mlx.load(out)
    assert model.args.num_hidden_layers == make_config("air-tiny")["num_hidden_layers"]


def test_second_resolve_fetches_no_file_content(hub, checkpoint, tmp_path):
    first = resolve(hub, tmp_path, REPO)
    n = len(hub.log)
    second = resolve(hub, tmp_path, REPO)
    assert second == first
    again = hub.log[n:]
    assert [p for m, p, _ in again if "/resolve/" in p] == []
    # Only the branch -> commit lookup; the tree listing and every file come from the cache.
    assert [(m, p) for m, p, _ in again] == [("GET", f"/api/models/{REPO}/revision/main")]


def test_dropped_connection_is_retried_in_the_same_call_with_range(hub, checkpoint, tmp_path):
    # huggingface_hub retries a dropped transfer itself, asking with Range for what it has
    # not written yet; it writes in 10 MiB chunks, so bytes after the last whole chunk are
    # asked again. A 25 MiB file dropped at half resumes at 10 MiB; a small shard restarts.
    big = {"config.json": checkpoint["config.json"], "model.safetensors": os.urandom(25 << 20)}
    hub.repos["zai-org/Big"] = {**big, "original/model.safetensors": b"not for us"}
    hub.faults.update({SHARD: ["drop"], "model.safetensors": ["drop"]})
    r = resolve(hub, tmp_path, "zai-org/Big")
    _same_files(Path(r["path"]), big)  # no index: the top-level *.safetensors, not original/
    assert [h.get("range") for f, h in hub.gets("zai-org/Big") if f == "model.safetensors"] == \
        [None, f"bytes={10 << 20}-"]
    r = resolve(hub, tmp_path, REPO)
    _same_files(Path(r["path"]), checkpoint)
    assert [h.get("range") for f, h in hub.gets() if f == SHARD] == [None, None]


def test_failed_download_is_one_line_and_a_rerun_completes_it(hub, checkpoint, tmp_path):
    # The connection drops, and the retry (Range) is refused: the call gives up.
    hub.faults[SHARD] = ["drop", 503]
    r = resolve(hub, tmp_path, REPO)
    assert "error" in r and "\n" not in r["error"]
    assert r["error"].startswith(f"{REPO}: download failed, the Hub answered 503")
    assert "run again" in r["error"]
    n_first = len(hub.gets())
    r = resolve(hub, tmp_path, REPO)
    _same_files(Path(r["path"]), checkpoint)
    # huggingface_hub 2.4 deletes a failed file's partial bytes: the shard starts over
    # (no Range), while every file that had finished is not fetched again.
    rerun = hub.gets()[n_first:]
    assert [(f, h.get("range")) for f, h in rerun if f == SHARD] == [(SHARD, None)]
    fetched = [f for f, _ in hub.gets() if f != SHARD]
    assert sorted(fetched) == sorted(set(checkpoint) - {SHARD})


def test_unknown_repo_and_revision(hub, tmp_path):
    r = resolve(hub, tmp_path, "zai-org/Nope")
    assert r["error"].startswith("zai-org/Nope: no such folder, and no such repo on the Hugging Face Hub")
    assert "HF_TOKEN" in r["error"]
    r = resolve(hub, tmp_path, REPO, revision="v9")
    assert r["error"] == f"{REPO}: revision 'v9' not found on the Hugging Face Hub"
    assert hub.gets() == []


def test_gated_repo_needs_the_token_and_gets_it_from_hf_token(hub, checkpoint, tmp_path):
    r = resolve(hub, tmp_path, "zai-org/Gated")
    assert r["error"].startswith("zai-org/Gated: gated repo")
    assert "HF_TOKEN" in r["error"] and "hf auth login" in r["error"]
    r = resolve(hub, tmp_path, "zai-org/Gated", env={"HF_TOKEN": "hf_s3cr3t"})
    _same_files(Path(r["path"]), checkpoint)
    authed = [h.get("authorization") for f, h in hub.gets("zai-org/Gated")]
    assert authed[-len(checkpoint):] == ["Bearer hf_s3cr3t"] * len(checkpoint)
    # The token argument (--token) wins over the environment.
    r = resolve(hub, tmp_path / "again", "zai-org/Gated", token="hf_s3cr3t", env={"HF_TOKEN": "hf_wrong"})
    _same_files(Path(r["path"]), checkpoint)


def test_hub_unreachable(checkpoint, tmp_path):
    hub = Hub({})
    hub.close()  # nothing listens at its address now
    r = resolve(hub, tmp_path, REPO)
    assert r["error"] == (f"{REPO}: cannot reach the Hugging Face Hub ({hub.url}); "
                          "check the network, or give a local model folder as SOURCE")
    r = resolve(hub, tmp_path, REPO, env={"HF_HUB_OFFLINE": "1"})
    assert r["error"] == f"{REPO}: HF_HUB_OFFLINE is set and not all its files are in the cache"


def test_unreachable_hub_after_a_complete_download_uses_the_cache(hub, checkpoint, tmp_path):
    first = resolve(hub, tmp_path, REPO)
    assert resolve(hub, tmp_path, REPO, env={"HF_HUB_OFFLINE": "1"}) == first
    hub.close()
    assert resolve(hub, tmp_path, REPO) == first


def test_local_folder_and_bad_sources(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_source("model") == ((tmp_path / "model").resolve(), {"path": str((tmp_path / "model").resolve())})
    assert resolve_source(str(tmp_path / "model"))[0] == (tmp_path / "model").resolve()
    for bad in ("./nope", "nope", "/no/such/folder", "a/b/c", "~/nope", "org/na me", "org/x--y"):
        with pytest.raises(SourceError, match="no such folder, and not a Hugging Face repo id"):
            resolve_source(bad)
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(SourceError, match="is a file"):
        resolve_source("model/config.json")
    # a revision names a commit of a hub repo: given with a local folder it would be silently ignored
    with pytest.raises(SourceError, match="model: a local folder; --revision names a commit of a Hugging Face repo"):
        resolve_source("model", revision="main")


def test_repo_id_shapes():
    assert is_repo_id("zai-org/GLM-4.5-Air") and is_repo_id("mlx-community/GLM-4.5-Air-4bit")
    for s in ("GLM-4.5-Air", "./a", "../a/b", "a/b/c", "a\\b", ".a/b", "a/b.git", "a/", "/b"):
        assert not is_repo_id(s), s
