"""The run directory's object model (core/storage.py) and the one atomic writer (core/atomic.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from feddpa.core import atomic
from feddpa.core.config import build_config
from feddpa.core.storage import Checkpoints, RunDir, RunLocked
from feddpa.core.weighting import ClientBank


def test_an_interrupted_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic.atomic_write_json(path, {"round": 1})

    def crash(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write_json(path, {"round": 2})
    assert path.read_text() == '{\n  "round": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_the_rename_is_made_durable_by_fsyncing_the_directory(tmp_path, monkeypatch):
    synced: list[str] = []
    monkeypatch.setattr(atomic, "fsync_dir", lambda p: synced.append(str(p)))
    atomic.atomic_write_bytes(tmp_path / "f", b"x")
    assert synced == [str(tmp_path)]


def test_an_exclusive_write_never_overwrites(tmp_path):
    path = tmp_path / "tokens.json"
    atomic.atomic_write_bytes(path, b"first", exclusive=True, mode=0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(FileExistsError):
        atomic.atomic_write_bytes(path, b"second", exclusive=True)
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.json"]


def test_config_round_trips_and_a_missing_one_names_the_directory(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="has no config.yaml: not a feddpa run"):
        run.read_config()
    cfg = build_config({"name": "x", "federation": {"rounds": 3}})
    run.write_config(cfg)
    assert run.read_config().to_dict() == cfg.to_dict()


def test_metrics_append_drops_lines_of_redone_rounds(tmp_path):
    run = RunDir(tmp_path)
    for r in (0, 1, 2):
        run.append_metrics({"round": r}, r)
    run.append_metrics({"round": 1, "again": True}, 1)  # a resumed run redoing round 1
    assert run.read_metrics() == [{"round": 0}, {"round": 1, "again": True}]


def test_execution_record(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_execution() == (False, None)
    run.write_execution("auto")
    assert run.read_execution() == (True, "auto")


def test_a_new_run_is_refused_in_a_used_directory(tmp_path):
    run = RunDir(tmp_path)
    run.write_execution(None)
    run.ensure_new()  # what the CLI writes first is allowed
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(FileExistsError, match="continue it with --resume"):
        run.ensure_new()


def test_a_round_is_staged_committed_and_read_back(tmp_path):
    from peft import LoraConfig

    ckpts = Checkpoints(tmp_path / "checkpoints", keep=2)
    assert ckpts.latest() is None
    lora = LoraConfig(r=2, target_modules=["q"])
    local = {"a.lora_A.weight": torch.ones(2, 3)}
    bank = ClientBank.build(torch.randn(4, 5), 2)
    for step in range(3):
        stage = ckpts.stage(step)
        stage.write_client(7, local, bank, lora)
        state = {"completed_steps": step + 1, "clients": [3, 7]}
        ckpts.prepare(stage, {"g": torch.full((2,), float(step))}, lora)
        done = ckpts.commit(stage, state, {"round": step})
    latest = ckpts.latest()
    assert latest == done and latest.name == "round_00002"
    assert latest.completed_rounds() == 3 and latest.client_ids() == [3, 7]
    assert latest.metrics() == {"round": 2}
    assert torch.equal(latest.global_adapter()["g"], torch.full((2,), 2.0))
    files = latest.client(7)
    assert torch.equal(files.read_local()["a.lora_A.weight"], local["a.lora_A.weight"])
    assert torch.equal(files.read_bank().vectors, bank.vectors)
    assert latest.client(3).read_local() is None and latest.client(3).read_bank() is None
    kept = sorted(p.name for p in ckpts.root.iterdir())
    assert kept == ["LATEST", "round_00001", "round_00002"]  # keep=2, no stage left


def test_a_locked_run_directory_gets_nothing_written_by_a_new_train(tmp_path, capsys):
    """Before, the CLI wrote execution.json before any lock was taken: a second `feddpa train
    --run-dir X` while X was held overwrote the first run's record of how it was started."""
    from run_helpers import cli

    config = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
    run = RunDir(tmp_path / "run")
    run.write_execution("auto")
    with run.lock():
        code = cli("train", "--config", str(config), "--run-dir", str(run.path))
    assert code == 2
    assert "being written by pid" in capsys.readouterr().err
    assert run.read_execution() == (True, "auto")


def test_a_second_lock_is_refused(tmp_path):
    run = RunDir(tmp_path)
    with run.lock(), pytest.raises(RunLocked, match=r"being written by pid \d+"), run.lock():
        pass
