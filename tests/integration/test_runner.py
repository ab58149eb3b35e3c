"""The in-process runner end to end: run directories, methods, resume, CLI, reports, P/TTP.

The FedDPA-T run uses the default multiple-choice MiniLM (it can score the synthetic tasks well
above chance); the other methods and the resume check use the tiny Llama (causal LM) on two tasks,
which is cheap to train and exercises the causal path through the loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from run_helpers import (
    adapter_files,
    cli,
    cli_train,
    latest_round,
    llama_cfg,
    metrics,
)

import feddpa.orchestrator.loop as loop
from feddpa.core.evaluation import ItemScores, summarize
from feddpa.core.records import Example
from feddpa.core.storage import load_adapter
from feddpa.datasets import read_manifest, read_test
from feddpa.orchestrator.executor import InProcessExecutor

ROUNDS = 2
CLIENTS = 8


@pytest.fixture(scope="module", autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dpa_t_run(small_cfg, tmp_path_factory) -> tuple[Path, str]:
    """FedDPA-T, MiniLM, 8 clients (one synthetic task each), 2 rounds, through `feddpa train`."""
    cfg = small_cfg(
        {
            "model": {"threads": 1},
            "data": {"train_per_task": 8, "test_per_task": 2},
            "federation": {"rounds": ROUNDS},
            "train": {"lr": 1e-3},
        }
    )
    run_dir = tmp_path_factory.mktemp("dpa_t") / "run"
    assert cli_train(cfg, run_dir) == 0
    return run_dir, cfg.method


RESUME_OVERRIDES = {"method": "feddpa_t", "train": {"local_epochs": 3}, "federation": {"rounds": 2}}


@pytest.fixture(scope="module")
def llama_t_run(small_cfg, tiny_llama_dir, tmp_path_factory) -> Path:
    """FedDPA-T on the tiny Llama, 2 clients, 2 rounds, uninterrupted (the resume reference)."""
    cfg = llama_cfg(small_cfg, tiny_llama_dir, RESUME_OVERRIDES)
    run_dir = tmp_path_factory.mktemp("llama_t") / "run"
    loop.train(cfg, run_dir, InProcessExecutor)
    return run_dir


# --- FedDPA-T end to end (MiniLM, 8 clients) ---------------------------------------------------


def test_feddpa_t_run_writes_config_metrics_and_checkpoints(dpa_t_run):
    run_dir, _ = dpa_t_run
    assert (run_dir / "config.yaml").is_file()
    records = metrics(run_dir)
    assert [r["round"] for r in records] == list(range(ROUNDS))
    for r in records:
        assert r["phase"] == "round"
        assert {"fit_s", "client_compute_s", "aggregate_s", "eval_s", "checkpoint_s"} <= set(
            r["timing"]
        )
        assert all(v >= 0 for v in r["timing"].values())
        assert set(r["losses"]) == {str(c) for c in range(CLIENTS)}
        assert r["eval"]["weighting"] == "gate"
        assert set(r["eval"]["clients"]) == {str(c) for c in range(CLIENTS)}
        assert 0 <= r["eval"]["avg"]["P"] <= 1 and 0 <= r["eval"]["avg"]["TTP"] <= 1
        # FedIT read from the same run: the global adapter alone, every client
        assert set(r["eval"]["global_only"]["clients"]) == {str(c) for c in range(CLIENTS)}
    # round 0 trains no local adapter: every client is scored by the global adapter alone,
    # exactly FedIT's scores
    for cid, c in records[0]["eval"]["clients"].items():
        assert c["mean_global_weight"] == 1.0 and c["local_weight_own"] == 0.0, cid
        alone = records[0]["eval"]["global_only"]["clients"][cid]
        assert (c["P"], c["TTP"]) == (alone["P"], alone["TTP"]), cid
    last_eval = records[-1]["eval"]["clients"]
    assert any(c["mean_global_weight"] < 1.0 for c in last_eval.values())  # the gate mixes
    assert all(set(v) == {"global"} for v in records[0]["losses"].values())
    assert all(set(v) == {"local", "global"} for v in records[1]["losses"].values())

    last = latest_round(run_dir)
    assert last.name == f"round_{ROUNDS - 1:05d}"
    assert (last.parent / "round_00000").is_dir()
    assert (last / "global" / "adapter_model.safetensors").is_file()
    assert (last / "global" / "adapter_config.json").is_file()
    for cid in range(CLIENTS):
        cdir = last / "clients" / f"client_{cid:05d}"
        assert (cdir / "local" / "adapter_model.safetensors").is_file(), cdir
        assert (cdir / "bank.safetensors").is_file(), cdir
    assert not list((run_dir / "checkpoints").glob(".stage_*"))


def test_feddpa_t_run_writes_results(dpa_t_run):
    run_dir, method = dpa_t_run
    results = run_dir / "results"
    for name in ("results.md", "results.csv", "curves.png", "clients.png", "weights.png"):
        assert (results / name).stat().st_size > 0, name
    table = (results / "results.md").read_text()
    assert f"{method} P" in table and "**average**" in table
    assert "global adapter alone (= FedIT) P" in table and "local weight, own items" in table
    rows = (results / "results.csv").read_text().splitlines()
    assert rows[0] == "method,client,tasks,P,TTP" and len(rows) == 1 + 2 * (CLIENTS + 1)


def own_task_chance(run_dir: Path) -> float:
    manifest = read_manifest(str(run_dir / "data"))
    test = read_test(str(run_dir / "data"), manifest)
    per_client = []
    for info in manifest.clients:
        own = [1 / len(e.options) for e in test if e.task in info.tasks]
        per_client.append(sum(own) / len(own))
    return sum(per_client) / len(per_client)


def test_feddpa_t_own_task_accuracy_beats_chance(dpa_t_run):
    run_dir, _ = dpa_t_run
    chance = own_task_chance(run_dir)
    assert chance == pytest.approx(0.3125)  # two 2-option tasks, six 4-option tasks
    final = metrics(run_dir)[-1]["eval"]["avg"]
    assert final["P"] > 0.5  # measured 0.6875 (16 own-task items); chance 0.3125


def test_saved_adapters_load_with_stock_peft(dpa_t_run):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModel

    from feddpa.core.models.loading import resolve_model_path

    run_dir, _ = dpa_t_run
    last = latest_round(run_dir)
    base = AutoModel.from_pretrained(resolve_model_path("minilm"))
    peft = PeftModel.from_pretrained(base, str(last / "global"))
    peft.load_adapter(str(last / "clients" / "client_00003" / "local"), adapter_name="local")
    for name, path in (
        ("default", last / "global"),
        ("local", last / "clients/client_00003/local"),
    ):
        loaded = get_peft_model_state_dict(peft, adapter_name=name)
        saved = load_adapter(path)
        assert set(loaded) == set(saved)
        for key, value in saved.items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if "lora_B" in k)


def test_eval_cli_reevaluates_with_another_weighting(dpa_t_run, capsys):
    run_dir, _ = dpa_t_run
    assert cli("eval", str(run_dir), "--set", "weighting.mode=fixed") == 0
    table = (run_dir / "results-eval" / "results.md").read_text()
    assert "fixed" in table and "**average**" in table
    assert "fixed" in capsys.readouterr().out
    assert cli("eval", str(run_dir), "--set", "train.lr=1") == 2
    assert "eval can only change" in capsys.readouterr().err


def test_eval_with_the_embedding_representation_rebuilds_the_banks(dpa_t_run, tmp_path, capsys):
    """The run's banks hold local-adapter representations; evaluating with the token-embedding
    representation rebuilds them (never mixes the two) and scores every client."""
    run_dir, _ = dpa_t_run
    out = tmp_path / "emb"
    sets = ["--set", "weighting.representation=embedding", "--out", str(out)]
    assert cli("eval", str(run_dir), *sets) == 0
    assert "gate" in capsys.readouterr().out
    assert "local weight, own items" in (out / "results.md").read_text()


# --- the other methods (tiny Llama, 2 clients) ----------------------------------------------------


class CountingExecutor(InProcessExecutor):
    calls: dict[str, int] = {}

    def evaluate(self, *args, **kwargs):
        CountingExecutor.calls["evaluate"] = CountingExecutor.calls.get("evaluate", 0) + 1
        return super().evaluate(*args, **kwargs)

    def evaluate_global(self, *args, **kwargs):
        CountingExecutor.calls["global"] = CountingExecutor.calls.get("global", 0) + 1
        return super().evaluate_global(*args, **kwargs)


def test_fedit_evaluates_the_global_adapter_once_for_all_clients(
    small_cfg, tiny_llama_dir, tmp_path
):
    cfg = llama_cfg(small_cfg, tiny_llama_dir, {"method": "fedit", "federation": {"rounds": 1}})
    CountingExecutor.calls = {}
    final = loop.train(cfg, tmp_path / "run", CountingExecutor)
    assert CountingExecutor.calls == {"global": 1}
    assert final["weighting"] == "global_only"
    ttps = {c["TTP"] for c in final["clients"].values()}
    assert len(final["clients"]) == 2 and len(ttps) == 1
    assert metrics(tmp_path / "run")[0]["bytes_up"] > 0


def test_feddpa_f_adds_a_finetune_step_from_the_global(small_cfg, tiny_llama_dir, tmp_path):
    cfg = llama_cfg(small_cfg, tiny_llama_dir, {"method": "feddpa_f", "federation": {"rounds": 1}})
    run_dir = tmp_path / "run"
    loop.train(cfg, run_dir, InProcessExecutor)
    records = metrics(run_dir)
    assert [(r["round"], r["phase"]) for r in records] == [(0, "round"), (1, "finetune")]
    assert records[0]["eval"]["weighting"] == "global_only"  # FedIT rounds before fine-tuning
    assert records[1]["eval"]["weighting"] == "gate"
    assert all(set(v) == {"finetune"} for v in records[1]["losses"].values())
    assert records[1]["bytes_up"] == 0

    ckpts = run_dir / "checkpoints"
    global_0 = load_adapter(ckpts / "round_00000" / "global")
    global_1 = load_adapter(ckpts / "round_00001" / "global")
    assert all(torch.equal(global_0[k], global_1[k]) for k in global_0)  # fine-tuning is local
    for cid in range(2):
        cdir = ckpts / "round_00001" / "clients" / f"client_{cid:05d}"
        local = load_adapter(cdir / "local")
        assert (cdir / "bank.safetensors").is_file()
        diff = sum(float((local[k] - global_1[k]).norm() ** 2) for k in local) ** 0.5
        norm = sum(float(v.norm() ** 2) for v in global_1.values()) ** 0.5
        # one step away from the global (lr 1e-2); a fresh adapter (new A) would be ~1.4·norm away
        assert 0 < diff < 0.3 * norm


def test_centralized_and_local_runs_produce_results(small_cfg, tiny_llama_dir, tmp_path):
    for method, weighting in (("centralized", "global_only"), ("local", "local_only")):
        cfg = llama_cfg(small_cfg, tiny_llama_dir, {"method": method, "federation": {"rounds": 1}})
        run_dir = tmp_path / method
        assert cli_train(cfg, run_dir) == 0
        (record,) = metrics(run_dir)
        assert record["eval"]["weighting"] == weighting
        assert set(record["eval"]["clients"]) == {"0", "1"}
        assert (run_dir / "results" / "results.md").is_file()
        if method == "centralized":
            assert set(record["losses"]) == {"-1"}  # one pooled client
            assert record["bytes_up"] > 0
        else:
            assert set(record["losses"]) == {"0", "1"}
            assert all(set(v) == {"local"} for v in record["losses"].values())
            assert record["bytes_up"] == 0
            for cid in range(2):
                assert (latest_round(run_dir) / f"clients/client_{cid:05d}/local").is_dir()


# --- loss, resume ---------------------------------------------------------------------------------


def test_feddpa_t_local_phase_loss_falls_between_epochs(llama_t_run):
    records = metrics(llama_t_run)
    for cid, phases in records[1]["losses"].items():
        local = phases["local"]
        assert len(local) == 3
        assert local[0] > local[1] > local[2], (cid, local)


def test_resume_after_a_crash_equals_the_uninterrupted_run(
    small_cfg, tiny_llama_dir, llama_t_run, tmp_path, monkeypatch
):
    cfg = llama_cfg(small_cfg, tiny_llama_dir, RESUME_OVERRIDES)
    run_dir = tmp_path / "run"
    real_step = loop.run_step

    def crash_after_round_0(cfg, step, *args):
        out = real_step(cfg, step, *args)
        if step == 0:
            raise RuntimeError("simulated crash after round 0 committed")
        return out

    monkeypatch.setattr(loop, "run_step", crash_after_round_0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(cfg, run_dir, InProcessExecutor)
    monkeypatch.undo()
    assert latest_round(run_dir).name == "round_00000"
    assert [r["round"] for r in metrics(run_dir)] == [0]
    (run_dir / "checkpoints" / ".stage_00001" / "junk").parent.mkdir()
    (run_dir / "checkpoints" / ".stage_00001" / "junk").write_text("half-written round")

    assert cli("train", "--resume", str(run_dir)) == 0

    ref, got = latest_round(llama_t_run), latest_round(run_dir)
    assert got.name == ref.name == "round_00001"
    ref_files, got_files = adapter_files(ref), adapter_files(got)
    assert "global/adapter_model.safetensors" in got_files
    assert {f"clients/client_{c:05d}/local/adapter_model.safetensors" for c in range(2)} <= set(
        got_files
    )
    assert got_files == ref_files
    ref_records, got_records = metrics(llama_t_run), metrics(run_dir)
    assert [r["round"] for r in got_records] == [0, 1]
    for a, b in zip(ref_records, got_records, strict=True):
        assert (a["losses"], a["eval"]) == (b["losses"], b["eval"])
    assert not list((run_dir / "checkpoints").glob(".stage_*"))


# --- user errors ----------------------------------------------------------------------------------


def test_existing_run_directory_is_refused(small_cfg, tmp_path, capsys):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=str(run_dir)):
        loop.train(small_cfg(), run_dir, InProcessExecutor)
    assert cli("train", "--run-dir", str(run_dir)) == 2
    err = capsys.readouterr().err
    assert str(run_dir) in err and "--resume" in err
    assert (run_dir / "notes.txt").read_text() == "keep me"


def test_cli_reports_a_bad_config_key(tmp_path, capsys):
    assert cli("train", "--set", "nonsense.key=1", "--run-dir", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert err.startswith("feddpa: error:") and "nonsense" in err
    assert not (tmp_path / "r").exists()


# --- P / TTP --------------------------------------------------------------------------------------


def test_summarize_p_is_own_task_mean_and_ttp_all_items():
    test = [
        Example("a1", "x", "a"),
        Example("a2", "x", "a"),
        Example("b1", "x", "b"),
        Example("c1", "x", "c"),
        Example("c2", "x", "c"),
    ]
    items = ItemScores(scores=(1.0, 0.0, 1.0, 0.5, 0.25), global_weights=(0.2, 0.4, 0.6, 0.8, 1.0))
    out = summarize(test, items, {"a"})
    assert out["P"] == pytest.approx(0.5)
    assert out["TTP"] == pytest.approx(2.75 / 5)
    assert out["per_task"] == pytest.approx({"a": 0.5, "b": 1.0, "c": 0.375})
    assert out["mean_global_weight"] == pytest.approx(0.6)
    two = summarize(test, items, {"a", "c"})
    assert two["P"] == pytest.approx(1.75 / 4) and two["TTP"] == out["TTP"]
