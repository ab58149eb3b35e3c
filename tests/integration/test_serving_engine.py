"""The serving engine against the in-process evaluator path (`ClientHost` + `score_items` +
the task model): per-request weighting modes, mixed-client batches, causal generation, the LRU of
client adapters, roll-out of a newly committed round, and the errors it raises."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from serving_fixtures import (
    Reference,
    causal_engine,
    causal_run,
    commit_scaled_global,
    latest_round,
    mc_engine,
    mc_run,
    torch_threads,
)

from feddpa.core.records import Example, format_options
from feddpa.datasets import read_manifest, read_test
from feddpa.serving.engine import Request, ServingEngine, UnknownClient

MODES = ["gate", "bank", "fixed", "global_only", "local_only", "sample"]
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return mc_run(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(run, tmp_path_factory) -> ServingEngine:
    return mc_engine(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(run) -> Reference:
    return Reference(run)


@pytest.fixture(scope="module")
def items(run) -> dict[str, list[Example]]:
    """Test items of the run by task."""
    data = str(run / "data")
    by_task: dict[str, list[Example]] = {}
    for ex in read_test(data, read_manifest(data)):
        by_task.setdefault(ex.task, []).append(ex)
    return by_task


@pytest.fixture(scope="module")
def client_items(run, items) -> dict[int, list[Example]]:
    """Per client: one item of its own task and one of another task."""
    manifest = read_manifest(str(run / "data"))
    tasks = sorted(items)
    out = {}
    for info in manifest.clients:
        own = sorted(info.tasks)[0]
        other = tasks[(tasks.index(own) + 1) % len(tasks)]
        out[info.client_id] = [items[own][0], items[other][1]]
    return out


def serve_one(engine: ServingEngine, req: Request):
    return engine.run_batch([req])[0]


def assert_same(a, b) -> None:
    """Two results of the same request: probabilities, weights and choice agree."""
    torch.testing.assert_close(torch.tensor(a.probs), torch.tensor(b.probs), rtol=0, atol=ATOL)
    assert a.global_weight == pytest.approx(b.global_weight, abs=1e-6)
    assert a.local_weight == pytest.approx(b.local_weight, abs=1e-6)
    assert a.choice == b.choice and a.version == b.version


# --- the engine equals the in-process evaluator -----------------------------------------------------


def test_run_serves_four_clients_with_local_adapters_and_banks(engine):
    assert engine.kind == "multiple_choice"
    assert engine.clients == [0, 1, 2, 3]
    assert engine.version == "round_00001"
    assert engine.weighting.mode == "gate"


@pytest.mark.parametrize("mode", MODES)
def test_predict_equals_in_process_evaluator(engine, reference, client_items, mode):
    weights = set()
    for cid, examples in client_items.items():
        ex = examples[cid % 2]  # own-task item for even clients, another task's for odd ones
        got = serve_one(engine, Request(cid, ex, "predict", mode))
        probs, global_w = reference.probs(cid, ex, mode)
        torch.testing.assert_close(torch.tensor(got.probs), probs, rtol=0, atol=ATOL)
        assert got.global_weight == pytest.approx(global_w, abs=1e-6)
        assert got.local_weight == pytest.approx(1 - global_w, abs=1e-6)
        assert got.choice == ex.options[int(probs.argmax())]
        assert sum(got.probs) == pytest.approx(1.0, abs=1e-5)
        weights.add(round(got.global_weight, 6))
    expected = {"fixed": {0.5}, "global_only": {1.0}, "local_only": {0.0}}
    if mode in expected:
        assert weights == expected[mode]
    elif mode == "gate":  # calibrated per client: a weight in [0, 1], different per item
        assert len(weights) > 1 and all(0 <= w <= 1 for w in weights)
    else:  # instance-wise: λ·mean cos (λ = 0.5), different per item
        assert len(weights) > 1 and all(abs(w) <= 0.5 for w in weights)


def test_default_mode_is_the_runs_weighting(engine, client_items):
    ex = client_items[2][0]
    assert_same(
        serve_one(engine, Request(2, ex, "predict")),
        serve_one(engine, Request(2, ex, "predict", "gate")),
    )


def test_client_without_local_adapter_is_served_by_the_global_alone(run, client_items, tmp_path):
    """A client that never trained a local adapter (not sampled under partial participation) is
    served, in every mode, by the global adapter alone: the rule `score_items` applies too."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cdir = latest_round(copy) / "clients" / "client_00003"
    shutil.rmtree(cdir)
    live = ServingEngine(copy)
    reference = Reference(copy)
    ex = client_items[3][0]
    for mode in (None, "gate", "bank", "fixed", "local_only"):
        got = serve_one(live, Request(3, ex, "predict", mode))
        probs, global_w = reference.probs(3, ex, mode)
        assert (got.global_weight, got.local_weight) == (1.0, 0.0), mode
        assert global_w == 1.0, mode
        torch.testing.assert_close(torch.tensor(got.probs), probs, rtol=0, atol=ATOL)


def test_sample_mode_is_seeded_per_client_and_instruction(engine, client_items):
    ex = client_items[1][0]
    first = serve_one(engine, Request(1, ex, "predict", "sample"))
    again = serve_one(engine, Request(1, ex, "predict", "sample"))
    assert first.probs == again.probs and first.global_weight == again.global_weight


def test_mixed_client_batch_equals_each_request_alone(engine, client_items):
    requests = [
        Request(0, client_items[0][0], "predict", "bank"),
        Request(1, client_items[1][0], "predict", "sample"),
        Request(2, client_items[2][1], "predict", "fixed"),
        Request(0, client_items[0][1], "predict", None),
        Request(3, client_items[3][0], "predict", "local_only"),
        Request(1, client_items[0][0], "predict", "global_only"),
        Request(3, client_items[1][1], "predict", "bank"),
    ]
    batch = engine.run_batch(requests)
    assert [r.client_id for r in batch] == [r.client_id for r in requests]
    for req, got in zip(requests, batch, strict=True):
        assert_same(got, serve_one(engine, req))
    # the same item served for two clients differs: each row used its own local adapter
    a = engine.run_batch([Request(0, client_items[0][0], "predict", "local_only")])[0]
    b = engine.run_batch([Request(1, client_items[0][0], "predict", "local_only")])[0]
    assert max(abs(x - y) for x, y in zip(a.probs, b.probs, strict=True)) > 1e-4


def test_options_are_parsed_from_the_request_text(engine):
    ex = Example(
        format_options("Route: my invoice is wrong", ["billing team", "logistics"]), "", "r"
    )
    got = serve_one(engine, Request(0, ex, "predict"))
    assert len(got.probs) == 2 and got.choice in ("billing team", "logistics")


# --- causal LM: greedy generation -------------------------------------------------------------------


@pytest.fixture(scope="module")
def causal(tmp_path_factory, tiny_llama_dir) -> tuple[ServingEngine, Reference]:
    run_dir = causal_run(tmp_path_factory, tiny_llama_dir)
    return causal_engine(tmp_path_factory, tiny_llama_dir), Reference(run_dir)


PROMPTS = [
    "Write a greeting.",
    "Route this ticket: my parcel never arrived and the tracking page shows nothing at all.",
    "Is the movie good?",
    "Tell me something about cats and dogs, briefly.",
]


def test_generation_single_and_mixed_batch_equal_in_process_generate(causal):
    engine, reference = causal
    assert engine.kind == "causal_lm" and engine.clients == [0, 1]
    requests = [
        Request(cid, Example(p, "", "request"), "generate", mode)
        for cid, p, mode in [
            (0, PROMPTS[0], None),
            (1, PROMPTS[1], "sample"),
            (0, PROMPTS[2], "fixed"),
            (1, PROMPTS[3], None),
            (1, PROMPTS[0], "local_only"),
        ]
    ]
    singles = [serve_one(engine, r) for r in requests]
    batch = engine.run_batch(requests)
    for req, one, many in zip(requests, singles, batch, strict=True):
        assert one.text == many.text
        assert one.global_weight == pytest.approx(many.global_weight, abs=1e-6)
        text, global_w = reference.generate(req.client_id, req.example, req.mode)
        assert one.text == text
        assert one.global_weight == pytest.approx(global_w, abs=1e-6)
    assert any(r.text for r in batch), "the tiny model generated nothing: the check is vacuous"


def test_causal_option_scores_equal_in_process(causal):
    engine, reference = causal
    ex = Example(format_options("Is the movie good?", ["positive", "negative"]), "", "request")
    other = Example(format_options("Route it", ["billing team", "logistics", "x"]), "", "r")
    batch = engine.run_batch(
        [Request(0, ex, "predict"), Request(1, other, "predict"), Request(1, ex, "predict")]
    )
    for cid, item, got in ((0, ex, batch[0]), (1, other, batch[1]), (1, ex, batch[2])):
        probs, global_w = reference.probs(cid, item)
        torch.testing.assert_close(torch.tensor(got.probs), probs, rtol=0, atol=ATOL)
        assert got.global_weight == pytest.approx(global_w, abs=1e-6)


def test_generate_max_new_tokens_decodes_a_prefix(causal):
    engine, _ = causal
    ex = Example(PROMPTS[1], "", "request")
    full = serve_one(engine, Request(0, ex, "generate"))
    short = serve_one(engine, Request(0, ex, "generate", None, 1))
    assert full.text.startswith(short.text)  # greedy: one token is the start of four


def test_max_tokens_and_beams_bound_the_decoding_itself(causal, monkeypatch):
    """`max_tokens` reaches generation as max_new_tokens (it was the run's eval.max_new_tokens,
    cut afterwards) and the beams are capped; rows with different bounds decode apart."""
    engine, _ = causal
    calls: list[dict] = []
    real = engine.model.peft.generate

    def spy(**kwargs):
        calls.append({k: kwargs[k] for k in ("max_new_tokens", "num_beams")})
        return real(**kwargs)

    monkeypatch.setattr(engine.model.peft, "generate", spy)
    evaluation = engine.cfg.eval.model_copy(update={"num_beams": 3})
    monkeypatch.setattr(engine, "cfg", engine.cfg.model_copy(update={"eval": evaluation}))
    ex = Example(PROMPTS[1], "", "request")
    engine.run_batch(
        [
            Request(0, ex, "generate", None, 2, max_beams=2),
            Request(1, ex, "generate", None, 1, max_beams=8),
            Request(1, ex, "generate", None, None, max_beams=2),
        ]
    )
    assert sorted(map(str, calls)) == sorted(
        map(
            str,
            [
                {"max_new_tokens": 2, "num_beams": 2},
                {"max_new_tokens": 1, "num_beams": 3},
                {"max_new_tokens": 4, "num_beams": 2},
            ],
        )
    )


def test_prompt_tokens_over_the_limit_are_refused(engine, client_items):
    from feddpa.serving.engine import TooLarge

    ex = client_items[0][0]
    with pytest.raises(TooLarge, match="the limit is 2"):
        engine.validate(Request(0, ex, "predict", max_prompt_tokens=2))
    engine.validate(Request(0, ex, "predict", max_prompt_tokens=10_000))


# --- LRU of client adapters -------------------------------------------------------------------------


def stack_slots_in_use(engine: ServingEngine) -> set[int]:
    """Slots of the engine's LocalStack holding an adapter; checks free slots are zeroed."""
    stack = engine.stack
    for slot in stack.free:
        assert all(not t[slot].any() for t in (*stack.A, *stack.B)), f"slot {slot} not cleared"
    return set(range(stack.capacity)) - set(stack.free)


def test_lru_keeps_capacity_clients_and_frees_evicted_adapters(run, engine, client_items):
    small = ServingEngine(run, capacity=2)
    for cid in (0, 1, 2):
        serve_one(small, Request(cid, client_items[cid][0], "predict"))
    assert list(small.slots) == [1, 2]
    assert stack_slots_in_use(small) == {s.index for s in small.slots.values()}
    assert len(stack_slots_in_use(small)) == 2
    serve_one(small, Request(1, client_items[1][0], "predict"))  # 1 becomes most recent
    serve_one(small, Request(3, client_items[3][0], "predict"))
    assert list(small.slots) == [1, 3]
    assert stack_slots_in_use(small) == {s.index for s in small.slots.values()}

    requests = [Request(cid, client_items[cid][1], "predict") for cid in (0, 1, 2, 3, 0)]
    batch = small.run_batch(requests)  # more distinct clients than the capacity
    assert small.stack.capacity <= 2  # never past the capacity: the batch ran in parts
    assert len(small.slots) == 2
    assert stack_slots_in_use(small) == {s.index for s in small.slots.values()}
    for req, got in zip(requests, batch, strict=True):
        assert_same(got, serve_one(engine, req))


# --- roll-out of a new committed round --------------------------------------------------------------


def assert_waits_for_running_batch(live: ServingEngine, version: str) -> None:
    """While a batch holds the engine (run_batch runs in a worker thread; Serve's `describe` and
    `load_client` call in from the event loop), roll-out and client loading wait for it."""
    for call, unchanged in (
        (threading.Thread(target=live.refresh), lambda: live.version == version),
        (threading.Thread(target=live.slot, args=(3,)), lambda: 3 not in live.slots),
    ):
        with live.lock:
            call.start()
            time.sleep(0.2)
            assert unchanged()
        call.join(timeout=30)
        assert not unchanged()


def test_new_round_is_rolled_out_at_the_next_batch(run, client_items, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    live = ServingEngine(copy)
    ex = client_items[2][0]
    before = live.run_batch([Request(0, client_items[0][0]), Request(1, client_items[1][0])])
    old = serve_one(live, Request(2, ex, "predict", "fixed"))
    assert old.version == before[0].version == "round_00001"
    assert set(live.slots) == {0, 1, 2}

    committed = commit_scaled_global(copy, 3.0)
    assert committed.name == "round_00002" and latest_round(copy) == committed
    new = serve_one(live, Request(2, ex, "predict", "fixed"))
    assert new.version == "round_00002"
    assert max(abs(a - b) for a, b in zip(new.probs, old.probs, strict=True)) > 1e-4
    assert list(live.slots) == [2]  # cached clients were dropped with the old round
    assert stack_slots_in_use(live) == {live.slots[2].index}

    probs, global_w = Reference(copy, committed).probs(2, ex, "fixed")
    torch.testing.assert_close(torch.tensor(new.probs), probs, rtol=0, atol=ATOL)
    assert new.global_weight == pytest.approx(global_w)

    commit_scaled_global(copy, 1.0)
    assert_waits_for_running_batch(live, "round_00002")
    assert live.version == "round_00003" and list(live.slots) == [3]


def _garbage_global(path: Path) -> None:
    file = path / "global" / "adapter_model.safetensors"
    file.unlink()
    file.write_bytes(b"not safetensors")


def _reshaped_global(path: Path) -> None:
    """The last tensor (in key order) gets a wrong shape: the old swap copied the earlier ones
    in before it failed, a half-applied global under the old version label."""
    from safetensors.torch import load_file, save_file

    file = path / "global" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    last = sorted(tensors)[-1]
    tensors = {k: v * 5 for k, v in tensors.items()}
    tensors[last] = torch.zeros(3, 3)
    save_file(tensors, str(file))


def _garbage_bank(path: Path) -> None:
    bank = next(path.rglob("bank.safetensors"))
    bank.unlink()  # a new file: the old one is hard-linked into the served round
    bank.write_bytes(b"\x00" * 10)


def _no_such_round(path: Path) -> None:
    (path.parent / "LATEST").write_text("round_00042")


@pytest.mark.parametrize(
    "damage", [_garbage_global, _reshaped_global, _garbage_bank, _no_such_round]
)
def test_a_bad_new_round_never_replaces_the_served_one(run, client_items, tmp_path, damage):
    """Before, every request (health included) failed once LATEST named a bad round, and a global
    with one bad tensor was half copied in. Now the previous round keeps serving, unchanged; the
    engine reports degraded with the reason, and picks the round up once it is repaired."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    live = ServingEngine(copy)
    requests = [Request(cid, client_items[cid][0]) for cid in (0, 1)]
    before = live.run_batch(requests)
    new_round = commit_scaled_global(copy, 3.0)
    pristine = tmp_path / "pristine"
    shutil.copytree(new_round, pristine)
    damage(new_round)

    after = live.run_batch(requests)
    for a, b in zip(before, after, strict=True):
        assert_same(a, b)  # the same round, bit for bit: nothing half applied
    info = live.describe()
    assert info["version"] == "round_00001"
    assert info["problem"].startswith("LATEST" if damage is _no_such_round else "round_00002")
    assert "serving round_00001" in info["problem"]

    shutil.rmtree(new_round)
    shutil.copytree(pristine, new_round)  # repaired (LATEST too)
    (copy / "checkpoints" / "LATEST").write_text(new_round.name)
    live.retry_s = 0.0
    assert live.run_batch(requests)[0].version == "round_00002"
    assert live.describe()["problem"] is None


def test_a_failed_round_is_not_read_again_before_retry_s(run, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    live = ServingEngine(copy)
    _garbage_global(commit_scaled_global(copy, 3.0))
    reads: list[Path] = []
    real = live._read_round
    monkeypatch.setattr(live, "_read_round", lambda p: reads.append(p) or real(p))
    live.retry_s = 3600.0
    for _ in range(3):
        live.refresh()
    assert len(reads) == 1 and live.version == "round_00001"


def test_a_round_pruned_while_served_moves_serving_to_the_newest(run, client_items, tmp_path):
    """Training prunes old rounds. A client first asked for after its round was deleted used to
    be served without its local adapter (its directory was gone: "no local adapter"), or fail
    with FileNotFoundError; now the engine moves to the newest round and loads it from there."""
    from feddpa.serving.engine import RoundVanished

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    live = ServingEngine(copy)
    ex = client_items[3][0]
    committed = commit_scaled_global(copy, 3.0)
    shutil.rmtree(copy / "checkpoints" / "round_00001")  # pruned
    with pytest.raises(RoundVanished):
        live.slot(3)  # the slot alone does not look for a newer round
    got = live.run_batch([Request(3, ex, "predict", "local_only")])[0]
    assert got.version == "round_00002"
    probs, _ = Reference(copy, committed).probs(3, ex, "local_only")
    torch.testing.assert_close(torch.tensor(got.probs), probs, rtol=0, atol=ATOL)


def test_resident_clients_validate_while_a_batch_runs(run, client_items):
    """Requests of resident clients are checked without the batch lock (so they can join the next
    batch while one runs); a client that must be loaded waits for the running batch."""
    live = ServingEngine(run)
    serve_one(live, Request(0, client_items[0][0]))
    loader = threading.Thread(target=live.validate, args=(Request(3, client_items[3][0]),))
    with live.lock:  # as while run_batch holds the engine
        done = threading.Thread(target=live.validate, args=(Request(0, client_items[0][1]),))
        done.start()
        done.join(timeout=10)
        assert not done.is_alive()  # resident: validated without waiting
        loader.start()
        time.sleep(0.2)
        assert 3 not in live.slots  # not resident: waits for the lock
    loader.join(timeout=30)
    assert 3 in live.slots


def test_describe_never_waits_for_a_running_batch(run, client_items, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    live = ServingEngine(copy)
    commit_scaled_global(copy, 2.0)
    held, release = threading.Event(), threading.Event()

    def batch() -> None:  # holds the engine as run_batch does, in another thread
        with live.lock:
            held.set()
            release.wait(timeout=30)

    runner = threading.Thread(target=batch)
    runner.start()
    held.wait(timeout=10)
    answers: list[dict] = []
    asker = threading.Thread(target=lambda: answers.append(live.describe()))
    asker.start()
    asker.join(timeout=30)  # liveness only: a describe that waited would block until release
    assert answers and not release.is_set(), "describe waited for the running batch"
    info = answers[0]  # answers with the version being served
    assert info["version"] == "round_00001" and info["kind"] == "multiple_choice"
    release.set()
    runner.join(timeout=10)
    assert live.describe()["version"] == "round_00002"  # idle: picks up the new round


# --- errors -----------------------------------------------------------------------------------------


def test_unknown_client_raises(engine, client_items):
    ex = client_items[0][0]
    with pytest.raises(UnknownClient):
        engine.run_batch([Request(99, ex)])
    with pytest.raises(UnknownClient):
        engine.validate(Request(-1, ex))
    assert serve_one(engine, Request(0, ex)).probs  # the engine still serves afterwards


def test_generate_on_a_multiple_choice_run_is_refused(engine, client_items):
    with pytest.raises(ValueError, match="multiple_choice"):
        engine.validate(Request(0, client_items[0][0], "generate"))
    with pytest.raises(ValueError, match="OPTIONS"):
        engine.validate(Request(0, Example("no options here", "", "request"), "predict"))
    engine.validate(Request(0, client_items[0][0], "predict"))


def test_bank_mode_without_banks_is_refused(run, client_items, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for bank in latest_round(copy).rglob("bank.safetensors"):
        bank.unlink()
    no_banks = ServingEngine(copy)
    ex = client_items[0][0]
    for mode in ("bank", "sample", "gate", None):
        with pytest.raises(ValueError, match="no representation bank in this run"):
            no_banks.validate(Request(0, ex, "predict", mode))
        with pytest.raises(ValueError, match="no representation bank"):
            no_banks.run_batch([Request(0, ex, "predict", mode)])
    assert serve_one(no_banks, Request(0, ex, "predict", "fixed")).global_weight == 0.5


def test_rows_without_local_weight_share_option_encodings_across_clients():
    """Option sequences are encoded once per (text, weights, client); a row whose local weight is
    0 computes the same for every client, so its options are shared across clients."""
    from types import SimpleNamespace

    from feddpa.core.adapters import Mix
    from feddpa.core.models.mc import option_rows

    ex = Example(format_options("Pick one.", ["yes", "no", "maybe"]), "no", "t")
    route = SimpleNamespace(index=torch.tensor([0, 1]))  # option_rows reads the rows' adapters
    alone = option_rows([ex, ex], Mix(torch.ones(2), torch.zeros(2)), route)
    assert alone.texts == ["yes", "no", "maybe"] and alone.index == [[0, 1, 2], [0, 1, 2]]
    mixed = option_rows([ex, ex], Mix(torch.full((2,), 0.5), torch.full((2,), 0.5)), route)
    assert len(mixed.texts) == 6  # the local adapters differ: one encoding per client


# --- streaming: engine, batcher, the Personalizer and its Ray handle ------------------------------


def test_streamed_batch_hands_each_request_its_own_deltas(causal):
    """`on_text(i, delta)` gets request i's text as it is decoded, greedy rows and beam rows
    alike, in a batch of several clients; the deltas join to the request's result text."""
    engine, _ = causal
    requests = [
        Request(0, Example(PROMPTS[0], "", "request"), "generate", None, 4),
        Request(1, Example(PROMPTS[1], "", "request"), "generate", "fixed", 4),
        Request(1, Example(PROMPTS[2], "", "request"), "generate", None, 3, max_beams=1),
    ]
    parts: dict[int, list[str]] = {i: [] for i in range(len(requests))}
    batch = engine.run_batch(requests, lambda i, delta: parts[i].append(delta))
    for i, (req, result) in enumerate(zip(requests, batch, strict=True)):
        assert "".join(parts[i]) == result.text == serve_one(engine, req).text
        assert len(parts[i]) > 1  # token-sized deltas
        assert result.completion_tokens == req.max_new_tokens and result.finish_reason == "length"


def _fake_batch(requests: list[str], on_text=None) -> list[str]:
    """A batch function that streams each request's text in two deltas (the text: 'req!')."""
    if "bad" in requests and len(requests) > 1:
        if on_text is not None:
            for i in range(len(requests)):
                on_text(i, requests[i][:2])  # some text goes out before the batch fails
        raise ValueError("bad request")
    if "bad" in requests:
        raise ValueError("bad request")
    for i, req in enumerate(requests):
        if on_text is not None:
            on_text(i, req[:2])
            on_text(i, req[2:] + "!")
    return [req + "!" for req in requests]


def test_batcher_streams_deltas_then_the_result_next_to_plain_requests():
    import asyncio

    from feddpa.serving.batcher import Batcher

    async def scenario():
        batcher = Batcher(_fake_batch, max_batch_size=8, wait_s=0.05)

        async def collect(req: str) -> list[str]:
            return [item async for item in batcher.stream(req)]

        return await asyncio.gather(collect("alpha"), batcher.submit("plain"), collect("beta"))

    alpha, plain, beta = asyncio.run(scenario())
    assert alpha == ["al", "pha!", "alpha!"] and beta == ["be", "ta!", "beta!"]
    assert plain == "plain!"


def test_a_streamed_request_rerun_alone_sends_no_text_twice():
    """A batch that fails is rerun member by member; text a stream already sent is not sent
    again, and the culprit's stream ends with its own error."""
    import asyncio

    from feddpa.serving.batcher import Batcher

    async def scenario():
        batcher = Batcher(_fake_batch, max_batch_size=8, wait_s=0.05)

        async def collect(req: str) -> list[str]:
            out = []
            try:
                async for item in batcher.stream(req):
                    out.append(item)
            except ValueError as err:
                out.append(f"error: {err}")
            return out

        return await asyncio.gather(collect("alpha"), collect("bad"))

    alpha, bad = asyncio.run(scenario())
    assert alpha == ["al", "pha!", "alpha!"]
    assert bad == ["ba", "error: bad request"]


def test_the_personalizer_streams_and_the_ray_backend_relays(causal):
    """Inside the replica: deltas then the result, or a Failure as data. On the ingress side the
    handle is called with `options(stream=True)` (Ray Serve needs it for a generator method), a
    Failure is raised as itself and a failing call becomes a plain error."""
    import asyncio

    from feddpa.serving.deployment import Personalizer, RayBackend
    from feddpa.serving.engine import Result
    from feddpa.serving.errors import Failure, ServingError

    engine, _ = causal
    replica = Personalizer(lambda: engine, max_batch_size=4, batch_wait_s=0.0)  # no Serve actor
    req = Request(0, Example(PROMPTS[0], "", "r"), "generate", None, 4, request_id="r1")

    async def drain(items) -> list:
        return [item async for item in items]

    items = asyncio.run(drain(replica.stream(req)))
    *deltas, result = items
    assert isinstance(result, Result) and "".join(deltas) == result.text and len(deltas) > 1
    unknown = asyncio.run(drain(replica.stream(Request(9, req.example, "generate"))))
    assert unknown == [Failure(404, "unknown client 9: use an id from GET /v1/clients")]

    class Handle:
        def __init__(self, outcome: list) -> None:
            self.outcome, self.streaming, self.cancelled = outcome, False, False

        def options(self, stream: bool = False):
            self.streaming = stream
            return self

        @property
        def stream(self):
            return self

        def remote(self, req):
            assert self.streaming, "a generator method needs handle.options(stream=True)"
            return self

        def __aiter__(self):
            async def gen():
                for item in self.outcome:
                    if isinstance(item, Exception):
                        raise item
                    yield item

            return gen()

        def cancel(self):
            self.cancelled = True

    handle = Handle(items)
    assert asyncio.run(drain(RayBackend(handle).stream(req))) == items
    assert not handle.cancelled
    for outcome, status in (
        (["Hel", Failure(413, "too long")], 413),
        (["Hel", RuntimeError("ray::ServeReplica (pid=1)")], 500),
    ):
        handle = Handle(outcome)
        with pytest.raises(ServingError) as err:
            asyncio.run(drain(RayBackend(handle).stream(req)))
        assert err.value.failure.status == status and "ray::" not in err.value.failure.message
        assert handle.cancelled
