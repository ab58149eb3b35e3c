"""Fault-injection benchmark: a Ray run with evaluation on, under client-actor kills and driver
kills, audited round by round against what its own committed inputs produce.

    python benchmarks/faults.py                     # default: 3 trials x 5 rounds (~25 min, 2 cores)
    python benchmarks/faults.py --trials 1 --rounds 3   # quick look

One Ray head on 127.0.0.1 (`ray start`) serves every run; the driver is `feddpa train --ray ADDR`.
- reference: an uninterrupted run.
- trial 0 ("driver"): the driver is SIGKILLed at a random point and resumed with the README's
  command `feddpa train --resume RUN`. Its final round must be bit-identical to the reference.
- trials 1.. ("mixed"): in every round a random `--kill-fraction` of the client actors (at least
  one) is SIGKILLed at a random point of the round (fit, evaluation or commit; Ray restarts them),
  and the driver is killed and resumed once at a random point.

Every run, reference included, is then audited in this process (torch on 1 thread, as in a Ray
worker): for every committed round r and every client,
- a client that reported in round r: replaying its fit from round r-1's *committed* adapter, bank
  and global must give exactly the adapter and bank committed in round r; otherwise its update
  was lost (the commit kept something else) or it trained from a stale adapter;
- a client that did not report: its round-r files are round r-1's, byte for byte (carried);
- the global adapter of round r is the FedAvg of the replayed uploads of the reporters;
- the evaluation logged for round r equals an evaluation of the committed round r (no client was
  evaluated with a stale adapter).
A driver kill recomputes at most the round it interrupted: `rounds_recomputed` counts the rounds
whose stage existed when the driver died (resume starts at the round after LATEST).

Writes faults.json and faults.md into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402
import torch  # noqa: E402
from bench_common import machine_info, write_results  # noqa: E402

from feddpa.actors.host import ClientHost  # noqa: E402
from feddpa.core.config import ExperimentConfig, load_config  # noqa: E402
from feddpa.core.fedavg import FlatState, OrderedAverage  # noqa: E402
from feddpa.core.storage import (  # noqa: E402
    BANK_FILE,
    Round,
    client_dir,
    load_adapter,
    load_bank,
    round_name,
)
from feddpa.datasets import read_manifest, read_test  # noqa: E402
from feddpa.orchestrator.loop import evaluate, total_steps  # noqa: E402

log = logging.getLogger("bench.faults")
ROOT = Path(__file__).resolve().parent.parent
FEDDPA = [sys.executable, "-m", "feddpa.cli"]


# ----------------------------------------------------------------------------- the Ray head


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """`ray start --head` on 127.0.0.1 in its own temp dir; its worker processes are found as
    children of its raylet (so nothing else on the machine is ever killed)."""

    def __init__(self, num_cpus: int) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="rf-", dir="/tmp"))  # short: socket paths
        self.address = f"127.0.0.1:{free_port()}"
        cmd = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={self.address.split(':')[1]}",
            f"--num-cpus={num_cpus}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={self.temp}",
        ]
        subprocess.run(cmd, check=True, capture_output=True, env=os.environ.copy())

    def raylet(self) -> psutil.Process:
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if "raylet" in (proc.info["name"] or "") and str(self.temp) in cmd:
                return proc
        raise RuntimeError(f"no raylet of {self.temp} found")

    def workers(self, kind: str) -> list[psutil.Process]:
        """Live worker processes of actor class `kind` (their title is ray::KIND[.method])."""
        out = []
        for proc in self.raylet().children(recursive=True):
            try:
                title = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if title.startswith(f"ray::{kind}"):
                out.append(proc)
        return out

    def stop(self) -> None:
        ray_bin = str(Path(sys.executable).with_name("ray"))
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=self._env())
        shutil.rmtree(self.temp, ignore_errors=True)

    def _env(self) -> dict:
        return os.environ | {"RAY_TMPDIR": str(self.temp)}


def kill(proc: psutil.Process) -> bool:
    try:
        proc.send_signal(signal.SIGKILL)
        return True
    except psutil.Error:
        return False


# ----------------------------------------------------------------------------- fault injection


@dataclass
class Trial:
    name: str
    kind: str  # reference | driver | mixed
    run_dir: str
    completed: bool = False
    aborted: str | None = None
    wall_s: float = 0.0
    actor_kills: list[dict] = field(default_factory=list)
    driver_kills: list[dict] = field(default_factory=list)
    failures_logged: int = 0
    audit: dict = field(default_factory=dict)
    vs_reference: dict = field(default_factory=dict)


class ActorKiller(threading.Thread):
    """At the start of every round (its stage appears) pick ceil(fraction * actors) client actors
    and SIGKILL each at a uniform random time within the expected round duration."""

    def __init__(self, head: RayHead, run: Path, fraction: float, round_s: float, rng) -> None:
        super().__init__(daemon=True)
        self.head, self.ckpts, self.fraction, self.round_s, self.rng = (
            head,
            run / "checkpoints",
            fraction,
            round_s,
            rng,
        )
        self.kills: list[dict] = []
        self.stop = threading.Event()
        self.seen: set[int] = set()

    def run(self) -> None:
        while not self.stop.is_set():
            step = self._new_round()
            if step is None:
                time.sleep(0.05)
                continue
            actors = self.head.workers("ClientActor")
            if not actors:
                continue
            k = max(1, int(-(-self.fraction * len(actors) // 1)))
            at = sorted(self.rng.uniform(0, self.round_s) for _ in range(k))
            victims = self.rng.sample(actors, min(k, len(actors)))
            t0 = time.monotonic()
            for delay, proc in zip(at, victims, strict=False):
                if self.stop.wait(max(0.0, t0 + delay - time.monotonic())):
                    return
                if kill(proc):
                    self.kills.append({"round": step, "at_s": round(delay, 2), "pid": proc.pid})

    def _new_round(self) -> int | None:
        for stage in sorted(self.ckpts.glob(".stage_*")):
            step = int(stage.name.split("_")[-1])
            if step not in self.seen:
                self.seen.add(step)
                return step
        return None


def committed_steps(run: Path) -> int:
    latest = run / "checkpoints" / "LATEST"
    if not latest.is_file():
        return 0
    state = run / "checkpoints" / latest.read_text().strip() / "state.json"
    return json.loads(state.read_text())["completed_steps"]


def round_walls(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln)["timing"]["wall_s"] for ln in lines]


def run_trial(trial: Trial, head: RayHead, train_args: list[str], args, ref: Trial, rng) -> None:
    """Kill points come from the reference's timing: start-up, then rounds of its mean length."""
    run = Path(trial.run_dir)
    log_file = run.parent / f"{run.name}.log"
    killer, kill_at = None, None
    if trial.kind != "reference":
        walls = round_walls(Path(ref.run_dir))
        startup = ref.wall_s - sum(walls)
        kill_at = startup + rng.uniform(0.05, 0.95) * sum(walls)
    if trial.kind == "mixed":
        killer = ActorKiller(head, run, args.kill_fraction, sum(walls) / len(walls), rng)
        killer.start()
    t0 = time.monotonic()
    cmd = [*FEDDPA, "train", *train_args, "--run-dir", str(run), "--ray", head.address]
    with open(log_file, "w") as out:
        while True:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            rc = wait_or_kill(proc, kill_at, t0)
            if rc is None:  # we killed the driver: everything of its job dies with it
                trial.driver_kills.append(driver_killed(head, run, time.monotonic() - t0))
                if killer is not None:
                    killer.seen.clear()  # the resumed driver redoes a round: kill in it too
                kill_at = None
                cmd = [*FEDDPA, "train", "--resume", str(run)]  # the README's resume command
                continue
            break
    trial.wall_s = time.monotonic() - t0
    if killer is not None:
        killer.stop.set()
        killer.join()
        trial.actor_kills = killer.kills
    trial.completed = rc == 0 and committed_steps(run) == total_steps(
        load_config(run / "config.yaml")
    )
    if not trial.completed:
        trial.aborted = f"exit {rc}; see {log_file}"


def wait_or_kill(proc: subprocess.Popen, kill_at: float | None, t0: float) -> int | None:
    while proc.poll() is None:
        if kill_at is not None and time.monotonic() - t0 >= kill_at:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return None
        time.sleep(0.05)
    return proc.returncode


def driver_killed(head: RayHead, run: Path, at_s: float) -> dict:
    """The CLI process was SIGKILLed; kill its driver actor too (a lost driver machine) and wait
    until Ray has reaped the job's actors."""
    for proc in head.workers("Driver"):
        kill(proc)
    committed = committed_steps(run)
    interrupted = [
        int(p.name.split("_")[-1]) for p in (run / "checkpoints").glob(".stage_*") if p.is_dir()
    ]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (head.workers("Driver") or head.workers("ClientActor")):
        time.sleep(0.2)
    return {
        "at_s": round(at_s, 1),
        "committed_steps": committed,
        "rounds_recomputed": len([s for s in interrupted if s >= committed]),
    }


# ----------------------------------------------------------------------------- the audit


def tensors_equal(a: dict, b: dict) -> tuple[bool, float]:
    if a.keys() != b.keys():
        return False, float("inf")
    diff = max((float((a[k].float() - b[k].float()).abs().max()) for k in a), default=0.0)
    return all(torch.equal(a[k], b[k]) for k in a), diff


def file_digest(directory: Path) -> str | None:
    if not directory.exists():
        return None
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(path.relative_to(directory).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


class Audit:
    """Replays a finished run from its committed rounds (see the module docstring)."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.cfg: ExperimentConfig = load_config(run / "config.yaml")
        self.data = str(run / "data")
        self.manifest = read_manifest(self.data)
        self.test = read_test(self.data, self.manifest)
        self.ids = self.manifest.client_ids
        self.ckpts = run / "checkpoints"
        lines = (run / "metrics.jsonl").read_text().splitlines()
        self.records = {r["round"]: r for r in map(json.loads, lines)}

    def round_dir(self, step: int) -> Path:
        return self.ckpts / round_name(step)

    def host_at(self, step: int) -> ClientHost:
        """A host whose clients are as committed after `step` (fresh when step < 0)."""
        host = ClientHost(self.cfg, self.data, self.ids, None)
        if step >= 0:
            host.restore(Round(self.round_dir(step)))
        return host

    def run_audit(self) -> dict:
        out = {
            "rounds": 0,
            "client_rounds_replayed": 0,
            "carried_forward": 0,
            "lost_or_stale": [],
            "carried_changed": [],
            "global_mismatch": [],
            "eval_mismatch": [],
            "max_abs_diff": 0.0,
        }
        steps = total_steps(self.cfg)
        for step in range(steps):
            self._round(step, out)
            out["rounds"] += 1
        return out

    def _round(self, step: int, out: dict) -> None:
        record = self.records[step]
        host = self.host_at(step - 1)
        global_prev = (
            load_adapter(self.round_dir(step - 1) / "global") if step > 0 else host.initial_global()
        )
        reported = sorted(int(c) for c in record["losses"])
        committed = self.round_dir(step)
        fit_ids = [-1] if self.cfg.method == "centralized" else record["sampled"]
        avg = OrderedAverage([c for c in fit_ids if c in reported])
        for cid in self.ids:
            cdir = client_dir(committed, cid)
            if cid not in reported:
                before = client_dir(self.round_dir(step - 1), cid) if step > 0 else None
                same = file_digest(cdir) == (file_digest(before) if before else None)
                out["carried_forward"] += 1
                if not same:
                    out["carried_changed"].append({"round": step, "client": cid})
                continue
            res = host.fit(cid, step, global_prev, None)
            if res.global_state is not None:
                avg.add(cid, FlatState.of(res.global_state), res.num_examples)
            state = host.clients[cid]
            if state.local is None:  # this round trained no local adapter (FedDPA-T round 0)
                ok, diff = not (cdir / "local").exists(), 0.0
            else:
                ok, diff = tensors_equal(state.local, load_adapter(cdir / "local"))
            if state.bank is not None:
                bank = load_bank(cdir / BANK_FILE)
                bank_ok, bank_diff = tensors_equal({"b": state.bank.vectors}, {"b": bank.vectors})
                ok, diff = ok and bank_ok, max(diff, bank_diff)
            out["client_rounds_replayed"] += 1
            out["max_abs_diff"] = max(out["max_abs_diff"], diff)
            if not ok:
                out["lost_or_stale"].append({"round": step, "client": cid, "max_abs_diff": diff})
        global_now = load_adapter(committed / "global")
        if avg.count:
            ok, diff = tensors_equal(avg.result(), global_now)
            if not ok:
                out["global_mismatch"].append({"round": step, "max_abs_diff": diff})
        if record["eval"]:
            self._eval(step, record["eval"], global_now, out)

    def _eval(self, step: int, logged: dict, global_now, out: dict) -> None:
        host = self.host_at(step)

        class Replay:  # the loop's evaluation over this host
            def evaluate(self, step, client_ids, global_state, weighting, global_scores=None):
                for cid in client_ids:
                    yield cid, host.evaluate(cid, global_state, step, weighting, global_scores)

            def evaluate_global(self, global_state):
                return host.evaluate_global(global_state)

        again = evaluate(Replay(), self.cfg, self.manifest, self.test, step, global_now)  # type: ignore[arg-type]
        for cid, got in logged["clients"].items():  # clients whose eval failed are not logged
            want = again["clients"][cid]
            if (got["P"], got["TTP"]) != (want["P"], want["TTP"]):
                out["eval_mismatch"].append(
                    {"round": step, "client": int(cid), "logged": got, "replayed": want}
                )


def compare(run: Path, ref: Path) -> dict:
    """Files of the final committed round, against the reference's."""
    a, b = run / "checkpoints", ref / "checkpoints"
    last_a, last_b = (
        (a / (a / "LATEST").read_text().strip()),
        (b / (b / "LATEST").read_text().strip()),
    )
    files = sorted(p.relative_to(last_b) for p in last_b.rglob("*.safetensors"))
    same = sum(
        (last_a / f).is_file() and (last_a / f).read_bytes() == (last_b / f).read_bytes()
        for f in files
    )
    return {"files": len(files), "identical": same}


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--trials", type=int, default=3, help="trial 0 kills the driver only")
    p.add_argument("--kill-fraction", type=float, default=0.1, help="client actors killed a round")
    p.add_argument("--actors", type=int, default=8, help="client actors (8 clients: one each)")
    p.add_argument("--train-per-task", type=int, default=40)
    p.add_argument("--test-per-task", type=int, default=10)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the Ray head")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill schedule")
    p.add_argument("--work", default=str(ROOT / "runs" / "faults"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--audit-only", action="store_true", help="re-audit the runs in --work")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)  # as in a Ray worker: the audit replays bit for bit
    start = time.monotonic()
    work = Path(args.work)
    if args.audit_only:
        audit_and_report(work, args, time.monotonic() - start)
        return
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    train_args = [
        "--config",
        args.config,
        *("--set", f"federation.rounds={args.rounds}"),
        *("--set", f"data.train_per_task={args.train_per_task}"),
        *("--set", f"data.test_per_task={args.test_per_task}"),
        *("--set", f"ray.num_actors={args.actors}"),
        *("--set", f"ray.cpus_per_actor={(args.num_cpus - 0.2) / args.actors:.3f}"),
        *("--set", "ray.max_restarts=1000"),  # every round kills some: never run out of restarts
        *("--set", "federation.min_fit_clients=1"),
        *("--set", "eval.every=1"),
        *("--set", f"keep_checkpoints={args.rounds + 2}"),  # the audit reads every round
    ]
    rng = random.Random(args.seed)
    head = RayHead(args.num_cpus)
    trials = [Trial("reference", "reference", str(work / "reference"))]
    trials += [
        Trial(f"trial-{i}", "driver" if i == 0 else "mixed", str(work / f"trial-{i}"))
        for i in range(args.trials)
    ]
    try:
        for trial in trials:
            log.info("%s (%s) ...", trial.name, trial.kind)
            run_trial(trial, head, train_args, args, trials[0], rng)
            log.info(
                "%s: %s in %.0f s",
                trial.name,
                "done" if trial.completed else trial.aborted,
                trial.wall_s,
            )
    finally:
        head.stop()
    state = {
        "trials": [asdict(t) for t in trials],
        "train_args": train_args,
        "run_s": time.monotonic() - start,
        "command": "python benchmarks/faults.py " + shlex.join(sys.argv[1:]),
    }
    (work / "trials.json").write_text(json.dumps(state, indent=1))
    audit_and_report(work, args, 0.0)


def audit_and_report(work: Path, args, spent_s: float) -> None:
    start = time.monotonic()
    state = json.loads((work / "trials.json").read_text())
    trials = [Trial(**t) for t in state["trials"]]
    for trial in trials:
        run = Path(trial.run_dir)
        if not trial.completed:
            continue
        lines = (run / "metrics.jsonl").read_text().splitlines()
        trial.failures_logged = sum(len(json.loads(ln)["failures"]) for ln in lines)
        log.info("auditing %s ...", trial.name)
        trial.audit = Audit(run).run_audit()
        trial.vs_reference = compare(run, Path(trials[0].run_dir))
    total_s = state["run_s"] + spent_s + time.monotonic() - start
    report(trials, args, state["train_args"], state["command"], total_s)


def report(trials: list[Trial], args, train_args: list[str], command: str, total_s: float) -> None:
    faulted = [t for t in trials if t.kind != "reference"]
    audited = [t for t in trials if t.audit]
    lost = sum(len(t.audit["lost_or_stale"]) for t in audited)
    carried = sum(len(t.audit["carried_changed"]) for t in audited)
    evals = sum(len(t.audit["eval_mismatch"]) for t in audited)
    globals_ = sum(len(t.audit["global_mismatch"]) for t in audited)
    recomputed = [k["rounds_recomputed"] for t in faulted for k in t.driver_kills]
    driver_only = [t for t in faulted if t.kind == "driver" and t.vs_reference]
    figures = {
        "runs_completed": (sum(t.completed for t in faulted), ">=", len(faulted)),
        "runs_aborted": (sum(not t.completed for t in faulted), "<=", 0),
        "adapters_lost_or_stale": (lost, "<=", 0),
        "carried_forward_changed": (carried, "<=", 0),
        "global_mismatches": (globals_, "<=", 0),
        "evaluations_with_stale_state": (evals, "<=", 0),
        "max_rounds_recomputed_per_driver_kill": (max(recomputed, default=0), "<=", 1),
        "driver_only_final_round_identical_files": (
            sum(t.vs_reference["identical"] for t in driver_only),
            ">=",
            sum(t.vs_reference["files"] for t in driver_only),
        ),
    }
    rows = [
        "| run | kind | completed | actor kills | driver kills (committed → recomputed) | failures logged "
        "| client-rounds replayed | carried forward | lost/stale | eval mismatches | final vs reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        a = t.audit or {}
        dk = ", ".join(f"{k['committed_steps']} → {k['rounds_recomputed']}" for k in t.driver_kills)
        rows.append(
            f"| {t.name} | {t.kind} | {'yes' if t.completed else 'NO: ' + str(t.aborted)} "
            f"| {len(t.actor_kills)} | {dk or '—'} | {t.failures_logged} "
            f"| {a.get('client_rounds_replayed', '—')} | {a.get('carried_forward', '—')} "
            f"| {len(a.get('lost_or_stale', [])) if a else '—'} "
            f"| {len(a.get('eval_mismatch', [])) if a else '—'} "
            f"| {t.vs_reference.get('identical', '—')}/{t.vs_reference.get('files', '—')} |"
        )
    lines = [
        "# Fault injection: client-actor kills and driver kills on a Ray run with evaluation on",
        "",
        f"Command: `{command}` ({total_s / 60:.0f} min on this machine).",
        "",
        f"Runs: `feddpa train {' '.join(shlex.quote(a) for a in train_args)} --ray <head>`; resumed with "
        "`feddpa train --resume RUN` (the README's command) after each driver kill.",
        "",
        "| figure | measured | target |",
        "|---|---|---|",
        *(f"| {k} | {v} | {op} {b} |" for k, (v, op, b) in figures.items()),
        "",
        *rows,
        "",
        "How to read it: every run is replayed from its own committed rounds (`Audit` in the "
        "script). *lost/stale* counts client-rounds whose committed adapter or bank is not "
        "exactly what the client's fit produces from the previous committed round (an update "
        "lost at commit, or a client that trained from a stale adapter); *eval mismatches* counts "
        "clients whose logged evaluation differs from an evaluation of the committed round. "
        "Trials with actor kills differ from the reference by design (a killed client's update "
        "is not in that round's average); the driver-only trial must match it file for file.",
        "",
    ]
    details = {"trials": [asdict(t) for t in trials], "train_args": train_args}
    meta = {"command": command, "total_s": total_s, "machine": machine_info()}
    write_results(Path(args.out), "faults", figures, details, meta, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
