"""`cluster.yaml` and the paper's GPU-cluster configs, checked offline.

The cluster config goes through Ray's own launcher checks — `prepare_config` (merge with the AWS
provider defaults, setup-command merging, Docker checks, per-type worker bounds) and
`validate_config` (the launcher's JSON schema and cross-field rules) — which is what `ray up`
runs before it contacts AWS. The AWS bootstrap step after that (`AWSNodeProvider.bootstrap_config`:
IAM, key pairs, subnets, security groups) needs boto3 and the network, so it is not called here;
the test asserts boto3 stays unimported."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import yaml

from feddpa.core.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
PAPER = {
    "feddpa_t": ROOT / "configs" / "paper_llama2_7b_feddpa_t.yaml",
    "feddpa_f": ROOT / "configs" / "paper_llama2_7b_feddpa_f.yaml",
}

launcher = pytest.importorskip("ray.autoscaler._private.util")


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(cluster) -> dict:
    """The config as `ray up` sees it after its offline checks."""
    boto3_before = "boto3" in sys.modules
    config = launcher.prepare_config(copy.deepcopy(cluster))
    launcher.validate_config(config)
    assert ("boto3" in sys.modules) == boto3_before, "the offline checks must not import boto3"
    return config


def gpu_types(config: dict) -> dict[str, dict]:
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if node["resources"].get("GPU", 0) > 0
    }


def test_cluster_yaml_passes_ray_launcher_validation(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] == "us-west-2"
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # client actors (which ask for a GPU) stay off it
    assert head["max_workers"] == 0


def test_cluster_has_a_gpu_worker_type_within_max_workers(prepared):
    gpus = gpu_types(prepared)
    assert gpus, "cluster.yaml needs a worker node type with a GPU resource"
    for node in gpus.values():
        assert node["resources"]["CPU"] > 0
        assert 1 <= node["min_workers"] <= node["max_workers"] <= prepared["max_workers"]
        assert node["node_config"]["InstanceType"]


def test_every_node_installs_the_project_with_pinned_torch(cluster, prepared):
    assert cluster["file_mounts"]["~/feddpa"] == "."
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = next(
        line.strip().strip('",') for line in pyproject.splitlines() if '"torch==' in line
    )
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged in
        commands = "\n".join(prepared[key])
        assert "pip install -q -e ~/feddpa" in commands, key
        assert torch_pin in commands, f"{key} must pin {torch_pin} as pyproject.toml does"
        before = commands.index(torch_pin) < commands.index("-e ~/feddpa")
        assert before, f"{key}: install torch before the project so its pin picks the build"


def test_ray_token_auth_is_on_everywhere_with_one_token(cluster):
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    assert all("RAY_AUTH_MODE=token" in c for c in ray_starts)
    assert "--env RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    assert "disabled" not in " ".join(starts + cluster["docker"]["run_options"])
    # the same token on every node: the file `ray get-auth-token --generate` writes locally
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_dashboard_listens_on_the_heads_loopback_only(cluster):
    (head,) = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


def test_shared_filesystem_is_mounted_into_every_container(cluster):
    mounts = " ".join(cluster["initialization_commands"])
    assert "/mnt/efs" in mounts and "-t efs -o tls" in mounts  # encrypted in transit
    assert "1777" not in mounts and "chown 1000:100 /mnt/efs" in mounts  # not world-writable
    assert "--volume /mnt/efs:/mnt/efs" in cluster["docker"]["run_options"]


def test_no_secret_is_put_on_a_ray_exec_command_line():
    """A `ray exec` command is echoed, logged and visible in `ps` on the node."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            if "ray exec" in line:
                assert "HF_TOKEN=" not in line and "hf_" not in line, f"{doc.name}: {line}"


@pytest.mark.parametrize("method", sorted(PAPER))
def test_paper_configs_load_with_the_paper_setting(method):
    cfg = load_config(PAPER[method])
    assert cfg.method == method
    assert (cfg.model.kind, cfg.model.dtype, cfg.model.device) == ("causal_lm", "bfloat16", "cuda")
    assert cfg.model.max_length == 512
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 16, 0.05)
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.data.source == "feddpa" and cfg.data.partition == "task"
    assert cfg.data.path and cfg.data.path.endswith("dataset1") and cfg.data.tasks is None
    assert (cfg.federation.rounds, cfg.federation.fraction_fit) == (20, 1.0)
    assert (cfg.train.epochs, cfg.train.local_epochs) == (10, 10)
    assert (cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.lr) == (64, 32, 3e-4)
    if method == "feddpa_f":
        assert cfg.train.finetune_epochs == 10
    assert (cfg.eval.causal, cfg.eval.num_beams, cfg.eval.max_new_tokens) == ("generate", 4, 80)
    assert (cfg.weighting.mode, cfg.weighting.weight_on, cfg.weighting.lam) == (
        "bank",
        "global",
        0.5,
    )
    assert (cfg.ray.gpus_per_actor, cfg.ray.cpus_per_actor) == (1, 4)
    assert cfg.with_absolute_paths().data.path == cfg.data.path  # already absolute: unchanged


@pytest.mark.parametrize("method", sorted(PAPER))
def test_paper_client_actors_fit_on_the_gpu_workers(prepared, method):
    cfg = load_config(PAPER[method])
    gpus = sum(n["resources"]["GPU"] * n["max_workers"] for n in gpu_types(prepared).values())
    cpus = sum(n["resources"]["CPU"] * n["max_workers"] for n in gpu_types(prepared).values())
    actors = cfg.ray.num_actors or 8
    assert actors * cfg.ray.gpus_per_actor <= gpus
    assert actors * cfg.ray.cpus_per_actor <= cpus
    assert cfg.output_dir.startswith("/mnt/efs"), "run directories must be on the shared mount"


def test_joining_a_cluster_keeps_its_auth_and_only_a_local_ray_disables_it(monkeypatch):
    """Token auth is on in cluster.yaml: a driver that joins must not switch it off for itself
    (os.environ) or for its workers (runtime_env); the private 127.0.0.1 instance disables it."""
    import ray

    from feddpa.orchestrator import driver

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    for key in driver.LOCAL_RAY_ENV:  # restored after the test
        monkeypatch.delenv(key, raising=False)
    driver.init_ray("10.0.0.1:6379")
    assert "RAY_AUTH_MODE" not in os.environ
    assert "RAY_AUTH_MODE" not in calls[0]["runtime_env"]["env_vars"]
    driver.init_ray("local")
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
    assert calls[1]["address"] == "local" and calls[1]["_node_ip_address"] == "127.0.0.1"
