"""benchmarks/gpu_suite.sh is not broken: its --cpu-smoke run (tiny sizes, on the CPU) exits 0
and prints every figure. On a CPU the "device" decoder is libjpeg-turbo, so its pixels and labels
must equal the CPU path's exactly."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_suite_cpu_smoke():
    env = {**os.environ, "PYTHON": sys.executable, "IMAGES": "8"}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--cpu-smoke"], capture_output=True,
                       text=True, env=env, timeout=600, cwd=REPO)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    for mode in ("model", "predict", "pipeline-cpu", "pipeline-device"):
        assert re.search(rf"^  {mode}\b.* [0-9.]+ images/s", out, re.M), mode
    assert re.search(r"DeepLabv2-R18 .* [0-9.]+ it/s", out)
    assert re.search(r"^teacher mIoU [0-9.]+  student mIoU [0-9.]+  difference [-+][0-9.]+$", out, re.M)
    assert re.search(r"^\d+ skipped, \d+ deselected in", out, re.M)  # cuda-marked tests found, skipped (no GPU)
    for kind in ("baseline 4:2:0", "baseline 4:4:4", "progressive 4:2:0"):
        assert re.search(rf"^  {kind} +0 +0\.000 +0\.00%$", out, re.M), kind
    assert "agree at 100.000% of pixels (8 masks)" in out
    assert re.search(r"^blobs +48x64 +19 ", out, re.M)  # the writers' table
    assert re.search(r"^decode on the GPU +[0-9.]+ images/s = \d+% of the model alone", out, re.M)
    assert out.rstrip().endswith("all steps ran")
