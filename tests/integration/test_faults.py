"""Client state under faults, in process (no Ray): the committed round, plus inside a round the
client's own staged files, is the only source of client state.

Each test names the fault it injects; each failed on the code before the state-lifecycle
redesign (restore from the latest commit at a host's first call, non-atomic staging, a commit of
every staged client, arrival-order FedAvg, a plain metrics rewrite, no run lock)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from run_helpers import cli, latest_round, llama_cfg, metrics

import feddpa.orchestrator.loop as loop
from feddpa.actors.host import ClientHost, FitResult
from feddpa.core.config import build_config
from feddpa.core.fedavg import FlatState, OrderedAverage, RunningAverage
from feddpa.core.storage import (
    RunDir,
    RunLocked,
    client_dir,
    load_adapter,
    load_bank,
    stage_client,
)
from feddpa.datasets import read_manifest
from feddpa.orchestrator.executor import InProcessExecutor

UNEQUAL = {"partition": "dirichlet", "num_clients": 3, "alpha": 0.5, "train_per_task": 6}


def two_round_cfg(small_cfg, llama_dir, **over):
    return llama_cfg(small_cfg, llama_dir, {"federation": {"rounds": 2}, **over})


# --- FedAvg order ---------------------------------------------------------------------------------


def test_ordered_average_is_bit_identical_for_any_arrival_order():
    g = torch.Generator().manual_seed(0)
    updates = {cid: {"w": torch.randn(257, generator=g) * 10 ** (cid - 3)} for cid in range(7)}
    sizes = {cid: 3 + 5 * cid for cid in range(7)}  # unequal client sizes
    results = []
    for seed in range(6):
        order = list(updates)
        random.Random(seed).shuffle(order)
        avg = OrderedAverage(list(updates))
        for cid in order:
            avg.add(cid, updates[cid], sizes[cid])
        results.append(avg.result()["w"])
    assert all(torch.equal(r, results[0]) for r in results)
    want = sum(updates[c]["w"].double() * sizes[c] for c in updates) / sum(sizes.values())
    torch.testing.assert_close(results[0], want.float(), rtol=1e-6, atol=0)


def test_ordered_average_skips_missing_clients_and_refuses_strangers():
    avg = OrderedAverage([4, 1, 9])
    avg.add(9, {"w": torch.tensor([9.0])}, 1)  # waits for 1 and 4
    assert avg.avg.count == 0 and avg.count == 1
    avg.skip(1)
    avg.add(4, {"w": torch.tensor([4.0])}, 3)
    assert avg.avg.count == 2
    assert float(avg.result()["w"]) == pytest.approx((4 * 3 + 9) / 4)
    with pytest.raises(ValueError, match="client 7"):
        OrderedAverage([1]).add(7, {"w": torch.zeros(1)}, 1)


class ShuffledExecutor(InProcessExecutor):
    """Delivers each round's fit results in a shuffled order (as Ray does, by completion)."""

    def fit(self, step, client_ids, global_state, stage):
        results = list(super().fit(step, client_ids, global_state, stage))
        random.Random(step + 17).shuffle(results)
        yield from results


def test_fedavg_through_the_loop_is_weighted_and_order_independent(
    small_cfg, tiny_llama_dir, tmp_path
):
    cfg = llama_cfg(
        small_cfg, tiny_llama_dir, {"method": "fedit", "federation": {"rounds": 1}, "data": UNEQUAL}
    )
    ordered, shuffled = tmp_path / "ordered", tmp_path / "shuffled"
    loop.train(cfg, ordered, InProcessExecutor)
    loop.train(cfg, shuffled, ShuffledExecutor)
    a = load_adapter(latest_round(ordered) / "global")
    b = load_adapter(latest_round(shuffled) / "global")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sizes = {c.num_examples for c in read_manifest(str(ordered / "data")).clients}
    assert len(sizes) > 1  # the client sizes really differ


# --- a NaN update ---------------------------------------------------------------------------------


class PoisoningExecutor(InProcessExecutor):
    """Client 1 returns a NaN global update in round 1."""

    def fit(self, step, client_ids, global_state, stage):
        for res in super().fit(step, client_ids, global_state, stage):
            if step == 1 and res.client_id == 1 and res.global_state is not None:
                bad = {k: torch.full_like(v, float("nan")) for k, v in res.global_state.items()}
                res = FitResult(res.client_id, res.num_examples, bad, res.losses)
            yield res


def test_a_nan_update_is_left_out_and_the_clients_previous_round_kept(
    small_cfg, tiny_llama_dir, tmp_path
):
    cfg = two_round_cfg(small_cfg, tiny_llama_dir, method="feddpa_t", federation={"rounds": 3})
    run_dir = tmp_path / "run"
    loop.train(cfg, run_dir, PoisoningExecutor)
    ckpts = run_dir / "checkpoints"
    for name in ("round_00001", "round_00002"):
        g = load_adapter(ckpts / name / "global")
        assert all(torch.isfinite(v).all() for v in g.values()), name
    records = metrics(run_dir)
    assert {"round": 1, "client": 1, "call": "fit", "error": "non-finite update"} in records[1][
        "failures"
    ]
    assert "1" not in records[1]["losses"]
    # round 0 trains no local adapter: client 1 has none in round 1 either (carried forward) …
    assert not client_dir(ckpts / "round_00001", 1).exists()
    assert client_dir(ckpts / "round_00001", 0).is_dir()
    # … and its round-2 fit started from that committed state, not the poisoned memory
    local = load_adapter(client_dir(ckpts / "round_00002", 1) / "local")
    assert all(torch.isfinite(v).all() for v in local.values())


# --- a restarted host inside a round --------------------------------------------------------------


def test_a_restarted_host_evaluates_a_finished_client_with_its_staged_round(
    small_cfg, tiny_llama_dir, tmp_path
):
    """Round 1 fit of client 0 is staged, then its host dies before the evaluation: the new host
    must evaluate client 0 with the round-1 adapter it staged, not the committed round 0's."""
    cfg = two_round_cfg(small_cfg, tiny_llama_dir, method="feddpa_t")
    run_dir = tmp_path / "run"
    real_step = loop.run_step

    def stop_before_round_1(cfg, step, *args):
        if step == 1:
            raise RuntimeError("stop")
        return real_step(cfg, step, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "run_step", stop_before_round_1)
        with pytest.raises(RuntimeError):
            loop.train(cfg, run_dir, InProcessExecutor)
    run = RunDir(run_dir)
    ckpts = run.checkpoints()
    latest = ckpts.latest()
    assert latest is not None
    g = latest.global_adapter()
    data = str(run_dir / "data")
    first = ClientHost(cfg, data, [0, 1], run)
    stage = ckpts.stage(1)
    first.fit(0, 1, g, stage)
    want = first.evaluate(0, g, 1)
    restarted = ClientHost(cfg, data, [0, 1], run)  # the actor came back
    got = restarted.evaluate(0, g, 1)
    assert got == want
    staged = load_adapter(client_dir(stage.path, 0) / "local")
    assert all(torch.equal(restarted.clients[0].local[k], v) for k, v in staged.items())
    assert restarted.clients[1].local is None  # client 1 had not finished round 1: committed state


def test_a_corrupt_adapter_fails_loudly_and_never_resets_the_client(
    small_cfg, tiny_llama_dir, tmp_path
):
    cfg = two_round_cfg(small_cfg, tiny_llama_dir, method="feddpa_t")
    run_dir = tmp_path / "run"
    loop.train(cfg, run_dir, InProcessExecutor)
    latest = latest_round(run_dir)
    bad = client_dir(latest, 1) / "local" / "adapter_model.safetensors"
    bad.write_bytes(b"\x00garbage")
    host = ClientHost(cfg, str(run_dir / "data"), [0, 1], RunDir(run_dir))
    g = load_adapter(latest / "global")
    for _ in range(2):  # still stale after a failed read: the second call fails again
        with pytest.raises(ValueError, match="client_00001/local/adapter_model.safetensors"):
            host.evaluate(1, g, 2)
    assert host.clients[1].local is None and 1 in host.stale
    host.evaluate(0, g, 2)  # the other client is unaffected
    assert host.clients[0].local is not None and 0 not in host.stale


# --- staging and commit ---------------------------------------------------------------------------


def test_a_client_stages_all_its_files_or_none(tmp_path):
    def half(cdir: Path) -> None:
        (cdir / "local").mkdir()
        (cdir / "local" / "adapter_model.safetensors").write_bytes(b"x")
        raise OSError("disk full before the bank")

    with pytest.raises(OSError):
        stage_client(tmp_path, 3, half)
    assert list((tmp_path / "clients").iterdir()) == []


def test_commit_takes_only_clients_that_reported(small_cfg, tiny_llama_dir, tmp_path):
    cfg = two_round_cfg(small_cfg, tiny_llama_dir, method="feddpa_t")
    run_dir = tmp_path / "run"
    loop.train(cfg, run_dir, InProcessExecutor)
    ckpts = RunDir(run_dir).checkpoints(3)
    previous = ckpts.latest()
    assert previous is not None
    stage = ckpts.stage(2)
    for cid in (0, 1):  # both staged a new local adapter; only client 0 reported
        stage_client(stage.path, cid, lambda d: (d / "marker").write_text("new"))
    state = {**previous.state(), "completed_steps": 3}
    g = previous.global_adapter()
    ckpts.prepare(stage, g, load_config_lora(cfg), reported={0})
    final = ckpts.commit(stage, state, {}).path
    assert (client_dir(final, 0) / "marker").is_file()
    assert not (client_dir(final, 1) / "marker").exists()
    old_bank = load_bank(client_dir(previous.path, 1) / "bank.safetensors")
    new_bank = load_bank(client_dir(final, 1) / "bank.safetensors")
    assert torch.equal(old_bank.vectors, new_bank.vectors)  # carried forward


def load_config_lora(cfg):
    from feddpa.core.models.loading import lora_config

    return lora_config(cfg.model, cfg.lora)


# --- the run directory: metrics, LATEST, one writer, the executor ---------------------------------


def test_metrics_line_lost_between_commit_and_write_is_restored(
    small_cfg, tiny_llama_dir, tmp_path
):
    cfg = two_round_cfg(small_cfg, tiny_llama_dir, method="fedit")
    run_dir = tmp_path / "run"
    real_append = loop.append_metrics

    def killed_after_commit(run_dir, record, upto):
        if record["round"] == 1:
            raise KeyboardInterrupt("killed after committing round 1")
        real_append(run_dir, record, upto)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "append_metrics", killed_after_commit)
        with pytest.raises(KeyboardInterrupt):
            loop.train(cfg, run_dir, InProcessExecutor)
    assert [r["round"] for r in metrics(run_dir)] == [0]
    loop.train(cfg, run_dir, InProcessExecutor, resume=True)  # nothing left to train
    assert [r["round"] for r in metrics(run_dir)] == [0, 1]


def test_a_corrupt_metrics_line_names_the_file_and_line(small_cfg, tiny_llama_dir, tmp_path):
    cfg = two_round_cfg(small_cfg, tiny_llama_dir, method="fedit", federation={"rounds": 1})
    run_dir = tmp_path / "run"
    loop.train(cfg, run_dir, InProcessExecutor)
    path = run_dir / "metrics.jsonl"
    path.write_text(path.read_text() + '{"round": 1, "trunc\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        loop.append_metrics(RunDir(run_dir), {"round": 1}, 1)


def test_latest_must_name_a_round(tmp_path):
    from feddpa.core.storage import latest_checkpoint

    (tmp_path / "LATEST").write_text("../..")
    with pytest.raises(ValueError, match="not a round directory"):
        latest_checkpoint(tmp_path)


def test_a_second_writer_is_refused_and_nothing_is_touched(small_cfg, tiny_llama_dir, tmp_path):
    cfg = two_round_cfg(small_cfg, tiny_llama_dir, method="fedit", federation={"rounds": 1})
    run_dir = tmp_path / "run"
    loop.train(cfg, run_dir, InProcessExecutor)

    def contents() -> dict:  # every file but the log the refused command appends to
        files = (p for p in run_dir.rglob("*") if p.is_file() and p.name != "train.log")
        return {p.relative_to(run_dir): p.read_bytes() for p in files if p.name != ".lock"}

    before = contents()
    with RunDir(run_dir).lock():  # as a first --resume holding the run
        with pytest.raises(RunLocked, match=r"being written by pid \d+"):
            loop.train(cfg, run_dir, InProcessExecutor, resume=True)
        assert cli("train", "--resume", str(run_dir)) == 2
    assert contents() == before


def test_resume_uses_the_executor_the_run_was_started_with(tmp_path, capsys):
    from feddpa.cli import resumed_executor

    RunDir(tmp_path).write_execution("local")
    assert resumed_executor(tmp_path, None, False) == "local"
    assert "on Ray (local), as it was started" in capsys.readouterr().err
    assert resumed_executor(tmp_path, None, True) is None  # --in-process, on purpose
    assert resumed_executor(tmp_path, "auto", False) == "auto"
    RunDir(tmp_path).write_execution(None)
    assert resumed_executor(tmp_path, None, False) is None


def test_running_average_still_rejects_bad_weights():
    with pytest.raises(ValueError, match="positive and finite"):
        RunningAverage().add(FlatState.of({"w": torch.zeros(1)}), float("nan"))


def test_discarding_a_client_whose_actor_died_marks_the_actor_instead_of_raising(monkeypatch):
    """A NaN update's client is discarded on its actor; if that actor has just died, `ray.get`
    raised RayActorError and ended the run. A restarted actor re-reads every client anyway, so
    the executor only marks it suspect (waited for before the next dispatch)."""
    from ray.exceptions import RayActorError

    import feddpa.orchestrator.ray_executor as rx

    class Actor:
        class discard:  # noqa: N801 - stands in for an actor method handle
            @staticmethod
            def remote(cid):
                return cid

    def dead(_ref, timeout=None):
        raise RayActorError()

    executor = object.__new__(rx.RayExecutor)  # no cluster: only discard's own logic
    executor.cfg = build_config({})  # its calls are bounded by ray.round_timeout_s
    actors = [Actor(), Actor()]
    executor.actors, executor.owner, executor.suspects = actors, {7: actors[1]}, set()
    monkeypatch.setattr(rx.ray, "get", dead)
    executor.discard([7])
    assert executor.suspects == {1}
