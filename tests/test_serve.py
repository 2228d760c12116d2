"""`seglabel serve --labelstudio` without Label Studio: where images may be read from (and every
refusal), the HTTP endpoints, and the command's refusals. With the real Label Studio:
test_labelstudio.py."""
from __future__ import annotations

import json
import logging
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_CONFIGS, write_images
from realtools import basic_auth_header
from seglabel.errors import UsageError
from seglabel.serve import Backend, BackendServer, ImageRefused, ImageSource, project_labels
from test_annotate_cli import run
from test_export import decode_brush_rle

CONFIG = """<View>
  <Image name="photo" value="$img"/>
  <BrushLabels name="paint" toName="photo">
    <Label value="SKY"/><Label value="road"/><Label value="unicorn"/>
  </BrushLabels>
</View>"""


# -- where images come from -----------------------------------------------------------------------
@pytest.fixture
def root(tmp_path) -> Path:
    write_images(tmp_path / "root" / "photos", ["a.jpg", "sub/b.png"], size=(20, 30))
    (tmp_path / "secret.jpg").write_bytes((tmp_path / "root" / "photos" / "a.jpg").read_bytes())
    (tmp_path / "root" / "photos" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    return tmp_path / "root"


def test_local_files_only_under_the_document_root(root):
    source = ImageSource(root)
    with source.open("/data/local-files/?d=photos/sub/b.png") as path:
        assert path == root / "photos" / "sub" / "b.png"
    with source.open("/data/local-files/?d=photos%2Fa.jpg") as path:  # decoded once, as Label Studio does
        assert path == root / "photos" / "a.jpg"
    refusals = {
        "/data/local-files/?d=../secret.jpg": "outside the document root",
        "/data/local-files/?d=photos/../../secret.jpg": "outside the document root",
        "/data/local-files/?d=photos/link.jpg": "outside the document root",  # a link pointing out
        "/data/local-files/?d=/etc/passwd": "no such file under the document root",  # relative to the root
        "/data/local-files/?d=": "no file named",
        "/data/upload/1/x.jpg": "no --labelstudio-url",
        "file:///etc/passwd": "not an address of Label Studio",
        "http://example.invalid/a.jpg": "not an address of Label Studio",
        "//example.invalid/a.jpg": "not an address of Label Studio",
        "photos/a.jpg": "not a Label Studio data URL",
        str(root / "photos" / "a.jpg"): "no --labelstudio-url",  # a plain path is a URL path, never a file
    }
    for url, reason in refusals.items():
        with pytest.raises(ImageRefused, match=reason):
            with source.open(url):
                pass


class FakeStudio(BaseHTTPRequestHandler):
    """A web server playing Label Studio's file serving: what the backend asks it for and how."""

    seen: list = []

    def do_GET(self):  # noqa: N802
        FakeStudio.seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "http://example.invalid/elsewhere.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = 5000 if self.path.startswith("/data/big") else 10
        status = 404 if "missing" in self.path else 200
        self.send_response(status)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.wfile.write(b"x" * size)

    def log_message(self, *args):
        pass


@pytest.fixture
def studio():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeStudio)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeStudio.seen = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_label_studio_urls_with_its_token_and_nothing_else(studio):
    source = ImageSource(url=studio + "/", token="T0K", max_bytes=1000)
    with source.open("/data/upload/1/a.jpg") as path:
        assert path.read_bytes() == b"x" * 10
    assert not path.exists()  # the download is removed after use
    with source.open(studio + "/data/local-files/?d=photos/a.jpg") as path:  # its own absolute URL
        assert path.read_bytes() == b"x" * 10
    assert FakeStudio.seen == [("/data/upload/1/a.jpg", "Token T0K"), ("/data/local-files/?d=photos/a.jpg", "Token T0K")]
    port = int(studio.rsplit(":", 1)[1])
    refusals = {
        "/redirect/a.jpg": "redirects are not followed",
        "/data/big.jpg": "larger than 1000 bytes",
        "/data/missing.jpg": "answered 404",
        f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/a.jpg": "not an address of Label Studio",
        f"http://localhost:{port}/a.jpg": "not an address of Label Studio",  # another host name
        f"http://user@127.0.0.1:{port}/a.jpg": "not an address of Label Studio",
        f"https://127.0.0.1:{port}/a.jpg": "not an address of Label Studio",
    }
    for url, reason in refusals.items():
        with pytest.raises(ImageRefused, match=reason):
            with source.open(url):
                pass
    assert [p for p, _ in FakeStudio.seen[2:]] == ["/redirect/a.jpg", "/data/big.jpg", "/data/missing.jpg"]


def test_image_source_settings_are_checked(tmp_path):
    with pytest.raises(UsageError, match="token"):
        ImageSource(url="http://127.0.0.1:8080")
    with pytest.raises(UsageError, match="Label Studio's address"):
        ImageSource(url="ftp://127.0.0.1/", token="t")
    with pytest.raises(UsageError, match="not a folder"):
        ImageSource(tmp_path / "nope")


def test_project_labels_matched_by_name(small_labelset):
    from seglabel.labelset import load_labelset

    labels = project_labels(CONFIG, load_labelset(small_labelset))
    [target] = labels.targets
    assert (target.from_name, target.to_name, target.data_key) == ("paint", "photo", "img")
    assert dict(target.names) == {0: "SKY", 2: "road"}  # exact, else ignoring case; the project's spelling
    assert labels.unknown == ("unicorn",) and labels.absent == ("grass",)
    for bad, reason in (("<View><Image", "not valid XML"), ("<View><Image name='i' value='$i'/></View>", "no BrushLabels")):
        with pytest.raises(UsageError, match=reason):
            project_labels(bad, load_labelset(small_labelset))


# -- the HTTP endpoints ---------------------------------------------------------------------------
@pytest.fixture
def backend(tmp_path, tiny_weights, small_labelset, root):
    from seglabel.annotate import AnnotateConfig
    from seglabel.predict import Protocol
    from seglabel.recipe import Recipe, prepare

    recipe = Recipe(labels=small_labelset, config=AnnotateConfig(out=tmp_path / "unused", protocol=Protocol(64)),
                    model="maskclip:tiny-vit", model_config=str(TINY_CONFIGS["tiny-vit"]),
                    pretrained=str(tiny_weights["tiny-vit"]), device="cpu", explicit=frozenset({"short_side"}))
    ready = prepare(recipe)
    return Backend(ready.segmenter, ready.labelset, ready.config, ImageSource(root))


@pytest.fixture
def server(backend):
    server = BackendServer(backend, "127.0.0.1", 0, auth=("ls", "pw"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def call(server, method, path, body=None, auth=("ls", "pw"), raw=None):
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = basic_auth_header(*auth)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(server.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_endpoints(server, backend, caplog):
    assert call(server, "GET", "/health") == (200, {"status": "UP", "model_class": "seglabel",
                                                   "model_version": backend.model_version})
    assert backend.model_version.startswith("seglabel-") and len(backend.model_version) == len("seglabel-") + 16
    with caplog.at_level(logging.WARNING, logger="seglabel"):
        assert call(server, "POST", "/setup", {"project": "7.1", "schema": CONFIG}) == (
            200, {"model_version": backend.model_version})
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("project 7.1:") and "'unicorn'" in line and "'grass'" in line
    assert call(server, "POST", "/webhook", {"action": "ANNOTATION_CREATED"}, auth=None) == (200, {"status": "ok"})
    assert call(server, "GET", "/versions")[1]["versions"] == [backend.model_version]
    assert call(server, "GET", "/nope")[0] == 404
    assert call(server, "POST", "/predict", raw=b"{not json")[0] == 400
    assert call(server, "POST", "/predict", {"tasks": "x", "label_config": CONFIG})[0] == 400
    assert call(server, "POST", "/predict", {"tasks": [], "label_config": "<View"})[0] == 400


def test_basic_auth_is_required(server):
    for auth in (None, ("ls", "wrong"), ("other", "pw")):
        for method, path in (("GET", "/health"), ("POST", "/setup"), ("POST", "/predict")):
            status, body = call(server, method, path, {"schema": CONFIG}, auth=auth)
            assert status == 401, (auth, path)


def test_predict_gives_brushes_per_task_and_skips_bad_images(server, backend, root, caplog):
    tasks = [{"id": 1, "data": {"img": "/data/local-files/?d=photos/a.jpg"}},
             {"id": 2, "data": {"img": "/data/local-files/?d=../secret.jpg"}},
             {"id": 3, "data": {"other": "x"}},
             {"id": 4, "data": {"img": "/data/local-files/?d=photos/sub/b.png"}}]
    with caplog.at_level(logging.WARNING, logger="seglabel"):
        status, body = call(server, "POST", "/predict", {"tasks": tasks, "label_config": CONFIG, "project": "7.1"})
    assert status == 200
    results = body["results"]
    assert len(results) == 4 and results[1] == [] and results[2] == []  # Label Studio stores none for those
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "task 2:" in warned and "outside the document root" in warned and "task 3:" in warned
    for task, prediction in ((tasks[0], results[0]), (tasks[3], results[3])):
        mask, confidence = backend.label(task["data"]["img"])
        assert prediction["model_version"] == backend.model_version
        assert prediction["score"] == confidence
        painted = {}
        for r in prediction["result"]:
            assert (r["from_name"], r["to_name"], r["type"]) == ("paint", "photo", "brushlabels")
            [label] = r["value"]["brushlabels"]
            painted[label] = decode_brush_rle(r["value"]["rle"]).reshape(*mask.shape, 4)[..., 3] > 0
        expected = {name: mask == k for k, name in ((0, "SKY"), (2, "road")) if (mask == k).any()}
        assert sorted(painted) == sorted(expected)
        for name in expected:
            np.testing.assert_array_equal(painted[name], expected[name])


def test_request_size_is_bounded(server):
    with socket.create_connection(server.server_address[:2], timeout=30) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic_auth_header("ls", "pw").encode()
                  + b"\r\nContent-Length: 999999999999\r\n\r\n")
        assert s.recv(200).startswith(b"HTTP/1.1 413")


# -- the command's refusals: one line, exit 2, before any model is loaded ----------------------------
@pytest.mark.slow
def test_serve_refusals(tmp_path, small_labelset):
    base = ["serve", "--labels", str(small_labelset), "--model", "maskclip:tiny-vit", "--port", "0"]
    cases = [
        ([*base, "--document-root", str(tmp_path)], "give --labelstudio"),
        ([*base, "--labelstudio"], "give --document-root"),
        ([*base, "--labelstudio", "--document-root", str(tmp_path / "nope")], "not a folder"),
        ([*base, "--labelstudio", "--labelstudio-url", "http://127.0.0.1:1"], "token"),
        ([*base, "--labelstudio", "--document-root", str(tmp_path), "--basic-auth", "useronly"], "USER:PASSWORD"),
    ]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        cases.append(([*base[:-1], port, "--labelstudio", "--document-root", str(tmp_path)], "already in use"))
        for args, reason in cases:
            r = run(*args, env={"LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": ""})
            assert r.returncode == 2, (args, r.stderr)
            assert reason in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def test_serve_takes_annotates_model_flags():
    """The same option objects: names, defaults, help and panels cannot drift apart."""
    import typer

    from seglabel.cli import app
    from seglabel.cli_serve import MODEL_FLAGS

    commands = typer.main.get_command(app).commands
    params = {cmd: {p.name: p for p in commands[cmd].params} for cmd in ("annotate", "serve")}
    for name in MODEL_FLAGS:
        a, s = params["annotate"][name], params["serve"][name]
        assert (a.opts, a.default, a.help) == (s.opts, s.default, s.help), name
    assert "out" not in params["serve"]
    shown = run("serve", "--help", env={"LABEL_STUDIO_API_KEY": "sekrit-token", "COLUMNS": "200"})
    assert shown.returncode == 0 and "LABEL_STUDIO_API_KEY" in shown.stdout and "sekrit-token" not in shown.stdout
