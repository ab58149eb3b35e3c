"""Small trained run directories for the serving tests, built once per test session.

`mc_run` is FedDPA-T on MiniLM (multiple choice, 4 synthetic tasks = 4 clients, 2 rounds);
`causal_run` is FedDPA-T on the tiny Llama of tests/conftest.py (2 clients, greedy generation).
Both stop after training: no evaluation, so they cost a few seconds each. `reference_probs` is
the in-process evaluator path (`ClientHost` + `score_items` + `option_probs`) that serving must
match.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from feddpa.core.config import ExperimentConfig, build_config

MC_TASKS = ("routing_acme", "routing_globex", "sentiment_movies", "animal_class")
CAUSAL_TASKS = ("sentiment_movies", "routing_acme")

_RUNS: dict[str, Path] = {}
_ENGINES: dict[str, object] = {}


def mc_config() -> ExperimentConfig:
    return build_config(
        {
            "name": "serve-mc",
            "seed": 5,
            "method": "feddpa_t",
            "model": {"kind": "multiple_choice", "max_length": 32, "threads": 1},
            "data": {"tasks": list(MC_TASKS), "train_per_task": 6, "test_per_task": 2},
            "federation": {"rounds": 2},
            "train": {"batch_size": 6, "micro_batch_size": 6, "lr": 2e-3},
            "eval": {"every": 0, "final": False, "batch_size": 32},
        }
    )


def causal_config(llama_dir: Path) -> ExperimentConfig:
    return build_config(
        {
            "name": "serve-causal",
            "seed": 5,
            "method": "feddpa_t",
            "model": {
                "kind": "causal_lm",
                "path": str(llama_dir),
                "max_length": 48,
                "threads": 1,
            },
            "data": {"tasks": list(CAUSAL_TASKS), "train_per_task": 4, "test_per_task": 2},
            "federation": {"rounds": 2},
            "train": {"batch_size": 4, "micro_batch_size": 4, "lr": 1e-2},
            "eval": {
                "every": 0,
                "final": False,
                "causal": "auto",
                "num_beams": 1,
                "max_new_tokens": 4,
            },
        }
    )


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run the block with `n` torch threads, then put the previous count back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(cfg: ExperimentConfig, run_dir: Path) -> Path:
    from feddpa.orchestrator.executor import InProcessExecutor
    from feddpa.orchestrator.loop import train

    train(cfg, run_dir, InProcessExecutor)
    return run_dir


def mc_run(factory: pytest.TempPathFactory) -> Path:
    """The multiple-choice run directory (trained on first use in this session)."""
    if "mc" not in _RUNS:
        with torch_threads(1):
            _RUNS["mc"] = _train(mc_config(), factory.mktemp("serve_mc") / "run")
    return _RUNS["mc"]


def causal_run(factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    """The causal-LM run directory (trained on first use in this session)."""
    if "causal" not in _RUNS:
        with torch_threads(1):
            _RUNS["causal"] = _train(
                causal_config(llama_dir), factory.mktemp("serve_causal") / "run"
            )
    return _RUNS["causal"]


def mc_engine(factory: pytest.TempPathFactory):
    """A `ServingEngine` over `mc_run`, shared by the test modules (its answers do not depend on
    what it has cached, so sharing it is safe)."""
    from feddpa.serving.engine import ServingEngine

    if "mc_engine" not in _ENGINES:
        with torch_threads(1):
            _ENGINES["mc_engine"] = ServingEngine(mc_run(factory))
    return _ENGINES["mc_engine"]


def causal_engine(factory: pytest.TempPathFactory, llama_dir: Path):
    """A `ServingEngine` over `causal_run`, shared like `mc_engine`."""
    from feddpa.serving.engine import ServingEngine

    if "causal_engine" not in _ENGINES:
        with torch_threads(1):
            _ENGINES["causal_engine"] = ServingEngine(causal_run(factory, llama_dir))
    return _ENGINES["causal_engine"]


def latest_round(run_dir: Path) -> Path:
    ckpts = run_dir / "checkpoints"
    return ckpts / (ckpts / "LATEST").read_text().strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def commit_scaled_global(run_dir: Path, factor: float) -> Path:
    """Commit round N+1 by hand: the previous global adapter with lora_B scaled by `factor`."""
    from feddpa.core.config import load_config
    from feddpa.core.models.loading import lora_config
    from feddpa.core.storage import RunDir

    cfg = load_config(run_dir / "config.yaml")
    ckpts = RunDir(run_dir).checkpoints(cfg.keep_checkpoints)
    previous = ckpts.latest()
    assert previous is not None
    state = previous.state()
    step = state["completed_steps"]
    new_global = {
        k: v * factor if ".lora_B." in k else v for k, v in previous.global_adapter().items()
    }
    state = {**state, "completed_steps": step + 1}
    stage = ckpts.stage(step)
    ckpts.prepare(stage, new_global, lora_config(cfg.model, cfg.lora))
    return ckpts.commit(stage, state, {}).path


class Reference:
    """The in-process evaluator path for one run: a `ClientHost` owning every client, restored
    from a committed round, weighing one item with `score_items` + the task model."""

    def __init__(self, run_dir: Path, checkpoint: Path | None = None) -> None:
        from feddpa.actors.host import ClientHost
        from feddpa.core import algorithms
        from feddpa.core.config import load_config
        from feddpa.core.storage import RunDir
        from feddpa.datasets import read_manifest

        self.cfg = load_config(run_dir / "config.yaml")
        data_dir = str(run_dir / "data")
        ids = read_manifest(data_dir).client_ids
        self.host = ClientHost(self.cfg, data_dir, ids, RunDir(run_dir))
        self.model = self.host.model
        self.weighting = algorithms.method_of(self.cfg).eval_weighting()
        self.load(checkpoint or latest_round(run_dir))

    def load(self, checkpoint: Path) -> None:
        from feddpa.core.storage import Round

        self.host.restore(Round(checkpoint))
        self.global_state = Round(checkpoint).global_adapter()

    def mix(self, cid: int, example, mode: str | None = None):
        """The client's adapters loaded as `global` / `local`, and the item's Mix under `mode`,
        as `score_items` (the evaluator) weighs it."""
        from feddpa.core.adapters import GLOBAL, LOCAL, Mix, load_adapter_state
        from feddpa.core.evaluation import ClientWeighting, score_items

        client = self.host.clients[cid]
        load_adapter_state(self.model.peft, GLOBAL, self.global_state)
        if client.local is not None:
            load_adapter_state(self.model.peft, LOCAL, client.local)
        weighting = self.weighting
        if mode is not None:
            weighting = weighting.model_copy(update={"mode": mode})
        who = ClientWeighting(cid, client.bank, client.local is not None)
        items = score_items(self.model, [example], weighting, who, self.cfg.seed, 1)
        global_w = items.global_weights[0]
        return Mix(torch.tensor([global_w]), torch.tensor([1 - global_w]))

    def probs(self, cid: int, example, mode: str | None = None) -> tuple[torch.Tensor, float]:
        """(option probabilities, weight on the global adapter) of one item."""
        with torch.no_grad():
            mix = self.mix(cid, example, mode)
            probs = self.model.option_probs([example], mix)[0]
        return probs, float(mix.as_rows(1)[0][0])

    def generate(self, cid: int, example, mode: str | None = None) -> tuple[str, float]:
        """(greedy continuation, weight on the global adapter) of one prompt."""
        with torch.no_grad():
            mix = self.mix(cid, example, mode)
            text = self.model.generate([example], mix)[0]  # type: ignore[attr-defined]
        return text, float(mix.as_rows(1)[0][0])
