"""``seglabel distill`` preempted (SIGTERM to its process group, as Slurm sends before SIGKILL):
it saves ``last.pt`` at the iteration it reached, exits 143 with one line, and the same
command resumes from there."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from test_distill_kill import distill_args, iteration_of, read_log  # noqa: F401 - distill_args is a fixture
from conftest import gated_seglabel
from test_runs import signal_group_when

ITERS = 20


@pytest.mark.slow
def test_sigterm_saves_last_pt_and_the_rerun_resumes(tmp_path, distill_args):  # noqa: F811
    out = tmp_path / "run"
    # the third iteration waits at a gate until the signal has been sent (see gated_seglabel)
    cmd = [*gated_seglabel("seglabel.distill.training:segmentation_loss"), *distill_args(out, iters=ITERS),
           "--save-every", "1000", "--workers", "1"]  # no periodic checkpoint: last.pt can only come from the SIGTERM
    gate = tmp_path / "gate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SEGLABEL_TEST_GATE": str(gate), "SEGLABEL_TEST_GATE_AFTER": "2"}
    code, stderr = signal_group_when(cmd, lambda: (out / "log.jsonl").is_file() and len(read_log(out / "log.jsonl")) >= 2,
                                     "two logged iterations", signal.SIGTERM, tmp_path / "stderr.txt", env,
                                     after_signal=gate.touch)
    assert code == 143, stderr
    assert stderr.strip().splitlines()[-1] == "seglabel: error: terminated (SIGTERM); run the same command to resume"
    assert not (out / "student.pt").exists()
    saved = iteration_of(out / "last.pt")
    assert 2 <= saved < ITERS

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {out / 'last.pt'} at iteration {saved}/{ITERS}" in r.stderr
    assert [rec["iter"] for rec in read_log(out / "log.jsonl")] == list(range(1, ITERS + 1))
    assert iteration_of(out / "last.pt") == ITERS and (out / "student.pt").is_file()
