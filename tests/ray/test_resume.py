"""Kill the training process (SIGKILL, Ray and all) after a committed round, resume, and end
bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import adapter_hashes, tiny_config

from feddpa.orchestrator.driver import train_on_ray

pytestmark = pytest.mark.ray


def test_sigkill_after_commit_then_resume_is_bit_identical(ray_local, tmp_path):
    cfg = tiny_config(federation={"rounds": 3}, eval={"every": 0})
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))

    train_on_ray(cfg, tmp_path / "whole", resume=False, address="local")

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "feddpa.cli",
            "train",
            "--config",
            str(config_file),
            "--run-dir",
            str(killed),
            "--ray",
            "local",
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    latest = killed / "checkpoints" / "LATEST"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if latest.is_file() and latest.read_text().strip() >= "round_00000":
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert latest.is_file(), "the killed run committed no round"
    committed = latest.read_text().strip()
    assert committed < "round_00002", "the run finished before it could be killed"

    train_on_ray(cfg, killed, resume=True, address="local")
    assert adapter_hashes(killed) == adapter_hashes(tmp_path / "whole")
