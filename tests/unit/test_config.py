"""Typed, frozen config: defaults, YAML + `--set` overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from feddpa.core.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    build_config,
    load_config,
    parse_override,
    save_config,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid():
    cfg = load_config(None)
    assert cfg == ExperimentConfig()
    assert cfg.method == "feddpa_t"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.lr) == (8, 16, 3e-4)
    assert cfg.weighting.lam == 0.5 and cfg.weighting.k == 5


def test_yaml_and_typed_nested_overrides(tmp_path):
    path = write(
        tmp_path,
        "method: fedit\ntrain:\n  lr: 0.001\n  epochs: 2\nmodel:\n  max_length: 32\n",
    )
    cfg = load_config(
        path,
        [
            "train.batch_size=32",
            "train.micro_batch_size=8",
            "federation.rounds=5",  # section absent from the file
            "weighting.topk=3",
            "weighting.weight_on=local",
            "data.tasks=[trec, snli]",
            "lora.dropout=0",
            "eval.max_test_per_task=null",
        ],
    )
    assert cfg.method == "fedit"
    assert cfg.train.lr == 0.001 and cfg.train.epochs == 2  # from the file
    assert cfg.model.max_length == 32
    assert cfg.model.path == "minilm"  # untouched sibling keeps its default
    assert cfg.train.batch_size == 32 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.micro_batch_size == 8
    assert cfg.federation.rounds == 5
    assert cfg.weighting.topk == 3 and cfg.weighting.weight_on == "local"
    assert cfg.data.tasks == ("trec", "snli")
    assert cfg.lora.dropout == 0.0
    assert cfg.eval.max_test_per_task is None


def test_override_beats_file_and_later_override_wins(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.001\n")
    cfg = load_config(path, ["train.lr=0.01", "train.lr=2e-5"])
    assert cfg.train.lr == pytest.approx(2e-5)


def test_parse_override_types_values_via_yaml():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=0.5") == (["a"], 0.5)
    assert parse_override("a=[1, x]") == (["a"], [1, "x"])
    assert parse_override("a= x y ") == (["a"], "x y")
    assert parse_override("a=") == (["a"], None)


def test_exponent_without_dot_still_becomes_a_float():
    # PyYAML reads `1e-3` as a string (YAML 1.1); validation coerces it for float fields
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3


@pytest.mark.parametrize("bad", ["novalue", "=3", " =x"])
def test_malformed_override_raises(bad):
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override(bad)


def test_apply_overrides_does_not_mutate_input():
    data = {"train": {"lr": 0.1}}
    out = apply_overrides(data, ["train.epochs=2"])
    assert data == {"train": {"lr": 0.1}}
    assert out == {"train": {"lr": 0.1, "epochs": 2}}


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        load_config(None, ["train.lrr=1"])


def test_unknown_yaml_key_is_named_with_the_file(tmp_path):
    path = write(tmp_path, "weighting:\n  lambda: 0.3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "weighting.lambda" in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_top_level_key_is_named():
    with pytest.raises(ConfigError, match="rounds"):
        build_config({"rounds": 3})


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.lr") as err:
        load_config(None, ["train.lr=-1"])
    assert "-1" in str(err.value)


@pytest.mark.parametrize(
    "override,key",
    [
        ("method=fedavg", "method"),
        ("weighting.mode=random", "weighting.mode"),
        ("weighting.lam=1.5", "weighting.lam"),
        ("lora.r=0", "lora.r"),
        ("federation.rounds=zero", "federation.rounds"),
        ("train.mix_a=2", "train.mix_a"),
    ],
)
def test_other_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_batch_size_must_be_a_multiple_of_micro_batch():
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(None, ["train.batch_size=10", "train.micro_batch_size=4"])
    cfg = load_config(None, ["train.batch_size=12", "train.micro_batch_size=4"])
    assert cfg.train.batch_size == 12


def test_feddpa_source_needs_a_path():
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_config(None, ["data.source=feddpa"])
    cfg = load_config(None, ["data.source=feddpa", "data.path=/data/feddpa"])
    assert cfg.data.path == "/data/feddpa"


def test_files_source_and_dirichlet_need_their_fields():
    with pytest.raises(ConfigError, match=r"data\.train_files"):
        load_config(None, ["data.source=files"])
    with pytest.raises(ConfigError, match=r"data\.num_clients"):
        load_config(None, ["data.partition=dirichlet"])


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(ValidationError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.method = "fedit"  # type: ignore[misc]
    assert cfg.train.lr == 3e-4


def test_missing_file_and_bad_yaml_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    assert load_config(write(tmp_path, "")) == ExperimentConfig()


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(None, ["method=feddpa_f", "data.tasks=[a, b]", "weighting.topk=2"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_absolute_paths_keep_the_embedded_model_names(tmp_path, monkeypatch):
    """Ray runs resolve paths before shipping the config to actors; `smollm2` became
    `$PWD/smollm2` (make run-llm failed in every actor), while a real directory is resolved."""
    from feddpa.core.config import EMBEDDED_MODELS, build_config

    monkeypatch.chdir(tmp_path)
    for name in EMBEDDED_MODELS:
        cfg = build_config({"model": {"kind": "causal_lm", "path": name}})
        assert cfg.with_absolute_paths().model.path == name
    local = build_config({"model": {"kind": "causal_lm", "path": "models/mine"}})
    assert local.with_absolute_paths().model.path == str(tmp_path / "models" / "mine")
