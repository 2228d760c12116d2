"""Shared fixtures: tiny random open_clip models (registered from tests/fixtures/*.json), their
weights saved as files, and folders of generated images."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
TINY_CONFIGS = {"tiny-vit": FIXTURES / "tiny-vit.json", "tiny-rn": FIXTURES / "tiny-rn.json"}
REPO = Path(__file__).parent.parent


@pytest.fixture(scope="session", autouse=True)
def text_cache(tmp_path_factory) -> Path:
    """Every test run (and the CLI it starts) caches text embeddings and weight hashes in its own
    folders."""
    import os

    folder = tmp_path_factory.mktemp("text-cache")
    os.environ["SEGLABEL_TEXT_CACHE"] = str(folder)
    os.environ["SEGLABEL_CACHE"] = str(tmp_path_factory.mktemp("seglabel-cache"))
    return folder


def build_tiny_clip(name: str, seed: int = 0):
    import open_clip

    from seglabel.models.clip import register_model_config

    register_model_config(TINY_CONFIGS[name])
    torch.manual_seed(seed)
    model = open_clip.create_model(name).eval()
    # open_clip initialises ResNet batch-norm statistics to (0, 1); random ones exercise more.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model, open_clip.get_tokenizer(name)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> dict[str, Path]:
    """name -> .safetensors file of a seeded random tiny model."""
    from safetensors.torch import save_file

    out = {}
    folder = tmp_path_factory.mktemp("weights")
    for name in TINY_CONFIGS:
        model, _ = build_tiny_clip(name)
        path = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        out[name] = path
    return out


def write_images(folder: Path, names: list[str], size=(40, 56), seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        h, w = size
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        arr[: h // 2] = (arr[: h // 2] // 4) + np.array([20, 60, 180], dtype=np.uint8)  # a blue-ish top half
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def small_labelset(tmp_path) -> Path:
    p = tmp_path / "small.yaml"
    p.write_text(
        "name: small\n"
        "templates: ['a photo of a {}.', 'a {}.']\n"
        "classes:\n"
        "  - sky\n"
        "  - name: grass\n"
        "    prompts: [grass, lawn]\n"
        "  - name: road\n"
        "    color: '#804080'\n"
    )
    return p


def gated_seglabel(target: str) -> list[str]:
    """``python -m seglabel`` in which ``target`` (``module:function``, looked up at each call)
    waits, after $SEGLABEL_TEST_GATE_AFTER calls, until the file $SEGLABEL_TEST_GATE exists. A test
    signals once that much progress shows and then opens the gate (or never does, for SIGKILL), so
    the signal always lands mid-run however fast the machine (a fast CI machine once finished all
    150 images before the signal came)."""
    module, function = target.split(":")
    code = f"""
import os, threading, time
import {module} as target
from seglabel.cli import main
real, gate, lock, count = target.{function}, os.environ["SEGLABEL_TEST_GATE"], threading.Lock(), [0]
after = int(os.environ["SEGLABEL_TEST_GATE_AFTER"])
def gated(*args, **kwargs):
    with lock:
        count[0] += 1
        n = count[0]
    while n > after and not os.path.exists(gate):
        time.sleep(0.01)
    return real(*args, **kwargs)
target.{function} = gated
main()
"""
    return [sys.executable, "-c", code]


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A real Label Studio for the whole test session (tests/realtools.py), stopped at its end;
    skipped with the reason where it is not installed."""
    from realtools import LabelStudio, label_studio_executable

    server = LabelStudio(label_studio_executable(), tmp_path_factory.mktemp("label-studio")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """One real S3 API (moto's server on 127.0.0.1, tests/s3server.py) for the session, stopped at
    its end; skipped with the reason where moto or s3fs is not installed."""
    from s3server import S3Server

    server = S3Server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path_factory):
    """The S3 server emptied for this test, and this process's environment (which processes it
    starts inherit) pointed at it alone: AWS_ENDPOINT_URL, test credentials, no profile, no instance
    metadata. fsspec's cached filesystems are dropped before and after, so none outlives its settings."""
    import s3fs

    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env(str(tmp_path_factory.mktemp("aws-home"))).items():
        monkeypatch.setenv(name, value)
    s3_server.reset()
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3_server.auth(False)
    s3fs.S3FileSystem.clear_instance_cache()
