"""The driver actor: one per run, it owns the round loop (sampling, dispatch, streaming FedAvg,
evaluation, commits) and the client actors. The CLI process only starts it and shows progress."""

from __future__ import annotations

import os
from pathlib import Path

import ray
from tqdm.auto import tqdm

from feddpa.core.config import ExperimentConfig
from feddpa.core.storage import RunDir
from feddpa.orchestrator.loop import total_steps, train
from feddpa.orchestrator.ray_executor import RayExecutor

# The environment of every worker of our jobs (runtime_env): offline, quiet
RAY_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning",
}
# Settings of a Ray instance this process starts itself (`local`), inherited by its processes.
# Never applied when joining a cluster: there the cluster's own settings (token auth) hold.
LOCAL_RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",  # bound to 127.0.0.1 and private to this process
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Serve restarts a proxy that is not ready within 5 s (three times, then gives up); on a busy
    # 2-core machine its start-up takes longer (measured: > 15 s while a training job ran)
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
}


def init_ray(address: str, num_cpus: int | None = None) -> None:
    """`local`: a fresh single-node Ray bound to 127.0.0.1; `auto` / ADDRESS: join a cluster."""
    if address == "local":
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": RAY_ENV}
    if address == "local":
        ray.init(
            address="local",  # a new instance, never another job's cluster on this machine
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env=runtime_env,
            log_to_driver=True,
        )
    else:
        ray.init(address=address, runtime_env=runtime_env)


class Driver:
    def __init__(self, cfg: ExperimentConfig, run_dir: str, resume: bool) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.executor: RayExecutor | None = None

    def _make_executor(self, cfg, data_dir, client_ids, run) -> RayExecutor:
        self.executor = RayExecutor(cfg, data_dir, client_ids, run)
        return self.executor

    def run(self) -> dict:
        return train(self.cfg, self.run_dir, self._make_executor, resume=self.resume)

    def progress(self) -> dict:
        return dict(self.executor.progress) if self.executor else {"step": -1}


def train_on_ray(cfg: ExperimentConfig, run_dir: Path, *, resume: bool, address: str) -> dict:
    """Start the driver actor for this run and follow it with a progress bar."""
    init_ray(address)
    if resume:
        cfg = RunDir(run_dir).read_config()
    driver_cls = ray.remote(num_cpus=cfg.ray.driver_cpus, max_concurrency=2)(Driver)  # type: ignore[call-overload]
    driver = driver_cls.remote(cfg, str(run_dir.resolve()), resume)
    ref = driver.run.remote()
    steps = total_steps(cfg)
    shown: dict = {}
    with tqdm(total=steps, desc="rounds", unit="round") as bar:
        while not ray.wait([ref], timeout=1.0)[0]:
            progress = ray.get(driver.progress.remote())
            if progress != shown and progress.get("step", -1) >= 0:
                shown = progress
                bar.n = progress["step"]
                done, sampled, failed = progress["done"], progress["sampled"], progress["failed"]
                bar.set_postfix_str(f"clients {done}/{sampled} failed {failed}")
        bar.n = steps
        bar.refresh()
    result = ray.get(ref)
    ray.kill(driver)
    return result
