"""Adversarial load: valid traffic from several clients through Ray Serve on 127.0.0.1 while bad
requests are mixed in. One bad request must never hurt a good one.

    .venv/bin/python benchmarks/adversarial.py               # ~6 min on 2 cores (trains a small run)
    .venv/bin/python benchmarks/adversarial.py --run-dir RUN --seconds 20

Serve runs the app with token auth and the default limits (`feddpa.serving.limits.Limits`). Two
phases of `--seconds` each, the same valid traffic in both: `--valid` closed-loop threads, each one
client predicting its own task's items with its own token; in the second phase `--bad` more
threads send, round-robin, the bad requests of `BAD` (malformed JSON, a 2 MB body, a lone
surrogate, 2,000 options, an option of 5,000 characters, another client's token, no token, an
unknown client, a bad weighting, 32 options whose "\n- x" lines once re-parsed into ~2,000, a
request abandoned by its client after 50 ms: an orphan unless cancelled), and `--slow` threads
each keep a body trickling in (answered 408 at `--body-timeout-s`). `--capacity` (default: half
the clients) keeps more distinct clients in the traffic than the Personalizer may hold. Reported: valid requests failed (target 0), 5xx answers to
anything (target 0), each bad kind's status codes, p50/p99 of valid requests without and with the
bad traffic, and the Personalizer replica's RSS before, between and after.
Writes adversarial.json and adversarial.md into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shlex
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Serve's proxy must answer its readiness check within 5 s, or it is restarted; on a 2-core box
# busy with another job it can take longer to start (measured): give it a minute
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")

import httpx2  # noqa: E402
import psutil  # noqa: E402
from bench_common import machine_info, write_results  # noqa: E402
from serving import pct, serve_on_loopback, train_run  # noqa: E402

from feddpa.datasets import read_manifest, read_test  # noqa: E402
from feddpa.serving.auth import create_tokens  # noqa: E402
from feddpa.serving.deployment import ServeOptions  # noqa: E402
from feddpa.serving.limits import Limits  # noqa: E402

log = logging.getLogger("bench.adversarial")


def bad_requests(clients: list[int], tokens: dict, text: str) -> list[tuple[str, dict]]:
    """(kind, httpx request kwargs) of every bad request sent in the second phase."""
    a, b = clients[0], clients[1]
    auth = {"Authorization": f"Bearer {tokens['clients'][str(a)]}"}
    url = f"/v1/clients/{a}/predict"
    js = {**auth, "Content-Type": "application/json"}
    return [
        ("malformed JSON", {"url": url, "content": b'{"instruction": ', "headers": js}),
        ("2 MB body", {"url": url, "json": {"instruction": "x" * (2 << 20)}, "headers": auth}),
        ("lone surrogate", {"url": url, "content": b'{"instruction": "x\\ud800"}', "headers": js}),
        (
            "2,000 options",
            {"url": url, "json": {"instruction": text, "options": ["o"] * 2000}, "headers": auth},
        ),
        (
            "option of 5,000 chars",
            {
                "url": url,
                "json": {"instruction": text, "options": ["a", "b" * 5000]},
                "headers": auth,
            },
        ),
        (
            "another client's token",
            {"url": f"/v1/clients/{b}/predict", "json": {"instruction": text}, "headers": auth},
        ),
        ("no token", {"url": url, "json": {"instruction": text}}),
        (
            "unknown client",
            {
                "url": "/v1/clients/987654/predict",
                "json": {"instruction": text},
                "headers": {"Authorization": f"Bearer {tokens['admin']}"},
            },
        ),
        (
            "bad weighting",
            {"url": url, "json": {"instruction": text, "weighting": "nope"}, "headers": auth},
        ),
        (
            "re-parsed options",
            {
                "url": url,
                "json": {"instruction": text, "options": ["o" + "\n- x" * 124] * 32},
                "headers": auth,
            },
        ),
        (
            "abandoned after 50 ms",
            {"url": url, "json": {"instruction": text}, "headers": auth, "timeout": 0.05},
        ),
    ]


def slow_body(base: str, token: str, cid: int, stop: float, status: Counter) -> None:
    """Uploads that trickle: headers and a few bytes, then nothing until the server answers."""
    host, port = base.removeprefix("http://").split(":")
    head = (
        f"POST /v1/clients/{cid}/predict HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n"
    )
    while time.monotonic() < stop:
        try:
            with socket.create_connection((host, int(port)), timeout=120) as sock:
                sock.sendall(head.encode() + b'{"instruction": ')
                first = sock.recv(4096).split(b"\r\n", 1)[0]
                status[int(first.split()[1]) if first else -1] += 1
        except OSError:
            status[-1] += 1


class Traffic:
    """Closed-loop threads: valid ones record latency and failures, bad ones status codes."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.lock = threading.Lock()
        self.valid_ms: list[float] = []
        self.valid_failed: Counter[str] = Counter()
        self.bad_status: dict[str, Counter[int]] = {}
        self.five_xx = 0

    def valid(self, cid: int, token: str, texts: list[str], stop: float, seed: int) -> None:
        rng = random.Random(seed)
        headers = {"Authorization": f"Bearer {token}"}
        with httpx2.Client(base_url=self.base, timeout=120) as client:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    r = client.post(
                        f"/v1/clients/{cid}/predict",
                        json={"instruction": rng.choice(texts)},
                        headers=headers,
                    )
                    err = None if r.status_code == 200 else f"http_{r.status_code}"
                except httpx2.HTTPError as exc:
                    err = type(exc).__name__
                with self.lock:
                    if err is None:
                        self.valid_ms.append((time.perf_counter() - t0) * 1e3)
                    else:
                        self.valid_failed[err] += 1
                        self.five_xx += err.startswith("http_5")

    def bad(self, kinds: list[tuple[str, dict]], stop: float, offset: int) -> None:
        i = offset
        with httpx2.Client(base_url=self.base, timeout=120) as client:
            while time.monotonic() < stop:
                kind, kwargs = kinds[i % len(kinds)]
                i += 1
                try:
                    status = client.post(**kwargs).status_code
                except httpx2.HTTPError:
                    status = -1  # connection-level failure
                with self.lock:
                    self.bad_status.setdefault(kind, Counter())[status] += 1
                    self.five_xx += 500 <= status < 600

    def summary(self) -> dict:
        return {
            "valid_ok": len(self.valid_ms),
            "valid_failed": sum(self.valid_failed.values()),
            "valid_failed_kinds": dict(self.valid_failed),
            "p50_ms": pct(self.valid_ms, 50),
            "p99_ms": pct(self.valid_ms, 99),
            "five_xx": self.five_xx,
            "bad_status": {k: dict(v) for k, v in self.bad_status.items()},
        }


def replica_rss_mb() -> float:
    """RSS of the Personalizer replica process(es), MB."""
    total = 0
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if title.startswith("ray::ServeReplica:feddpa:Personalizer"):
            total += proc.memory_info().rss
    return total / 2**20


def phase(
    base: str, clients, tokens, texts, kinds, seconds: float, n_valid: int, n_bad: int, n_slow=0
):
    traffic = Traffic(base)
    stop = time.monotonic() + seconds
    threads = [
        threading.Thread(
            target=traffic.valid,
            args=(cid, tokens["clients"][str(cid)], texts[cid], stop, k),
        )
        for k, cid in enumerate((clients * n_valid)[:n_valid])
    ]
    threads += [threading.Thread(target=traffic.bad, args=(kinds, stop, k)) for k in range(n_bad)]
    slow: Counter[int] = Counter()
    token = tokens["clients"][str(clients[0])]
    threads += [
        threading.Thread(target=slow_body, args=(base, token, clients[0], stop, slow))
        for _ in range(n_slow)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = traffic.summary()
    if n_slow:
        summary["bad_status"]["slow body"] = dict(slow)
        summary["five_xx"] += sum(n for s, n in slow.items() if 500 <= s < 600)
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", help="a trained multiple-choice run (default: train a small one)")
    p.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    p.add_argument("--valid", type=int, default=4, help="closed-loop threads of valid traffic")
    p.add_argument("--bad", type=int, default=2, help="closed-loop threads of bad requests")
    p.add_argument("--slow", type=int, default=8, help="threads of trickling uploads")
    p.add_argument("--body-timeout-s", type=float, default=2.0, help="the server's body deadline")
    p.add_argument("--capacity", type=int, help="clients per replica (default: half the clients)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="feddpa-adv-"))
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        data = {
            "source": "synthetic",
            "partition": "task",
            "train_per_task": 60,
            "test_per_task": 20,
        }
        run_dir, _ = train_run("adversarial", data, work)
    manifest = read_manifest(str(run_dir / "data"))
    clients = manifest.client_ids
    test = read_test(str(run_dir / "data"))
    texts = {
        info.client_id: [ex.instruction for ex in test if ex.task in info.tasks]
        for info in manifest.clients
    }
    tokens = create_tokens(clients, work / "tokens.json")
    kinds = bad_requests(clients, tokens, texts[clients[0]][0])
    options = ServeOptions(
        str(run_dir),
        capacity=args.capacity or max(1, len(clients) // 2),
        cpus_per_replica=1,
        tokens=str(work / "tokens.json"),
        limits=Limits(body_timeout_s=args.body_timeout_s),
    )
    with serve_on_loopback(options) as base:
        phase(base, clients, tokens, texts, kinds, min(5.0, args.seconds), len(clients), 0)  # warm
        rss = [replica_rss_mb()]
        log.info("valid traffic alone, %.0f s ...", args.seconds)
        clean = phase(base, clients, tokens, texts, kinds, args.seconds, args.valid, 0)
        rss.append(replica_rss_mb())
        log.info("valid traffic with bad requests mixed in, %.0f s ...", args.seconds)
        mixed = phase(
            base, clients, tokens, texts, kinds, args.seconds, args.valid, args.bad, args.slow
        )
        rss.append(replica_rss_mb())
        health = httpx2.get(f"{base}/healthz", timeout=30).json()
    total_s = time.perf_counter() - t_start
    command = "python benchmarks/adversarial.py " + shlex.join(sys.argv[1:])
    figures = {
        "valid_failed": (clean["valid_failed"] + mixed["valid_failed"], "<=", 0),
        "five_xx": (clean["five_xx"] + mixed["five_xx"], "<=", 0),
        "bad_requests_sent": (sum(sum(c.values()) for c in mixed["bad_status"].values()), None, 0),
        "p99_ms_valid_alone": (clean["p99_ms"], None, 0),
        "p99_ms_valid_with_bad": (mixed["p99_ms"], None, 0),
        "replica_rss_growth_mb": (rss[2] - rss[1], None, 0),
    }
    lines = [
        "# Adversarial load: bad requests mixed into valid traffic (Ray Serve, 127.0.0.1)",
        "",
        f"Command: `{command}` ({total_s / 60:.0f} min). One Personalizer replica (1 CPU), token "
        f"auth, default limits but a {args.body_timeout_s:g} s body deadline, capacity "
        f"{options.capacity} of {len(clients)} clients; {args.valid} valid closed-loop threads "
        f"(each a client with its own token), {args.bad} bad ones and {args.slow} slow uploads "
        f"in the second phase; {args.seconds:.0f} s per phase.",
        "",
        "| | valid alone | valid + bad |",
        "|---|---:|---:|",
        f"| valid requests answered 200 | {clean['valid_ok']} | {mixed['valid_ok']} |",
        f"| valid requests failed (target 0) | {clean['valid_failed']} | {mixed['valid_failed']} |",
        f"| 5xx answers to anything (target 0) | {clean['five_xx']} | {mixed['five_xx']} |",
        f"| p50 / p99 of valid requests, ms | {clean['p50_ms']:.0f} / {clean['p99_ms']:.0f} "
        f"| {mixed['p50_ms']:.0f} / {mixed['p99_ms']:.0f} |",
        f"| Personalizer RSS after the phase, MB (before: {rss[0]:.0f}) | {rss[1]:.0f} | {rss[2]:.0f} |",
        "",
        "Bad requests (second phase), status codes returned:",
        "",
        "| bad request | answers |",
        "|---|---|",
        *(
            f"| {kind} | {', '.join(f'{s}: {n}' for s, n in sorted(codes.items()))} |"
            for kind, codes in mixed["bad_status"].items()
        ),
        "",
        f"`/healthz` after the run: `{json.dumps(health)}`.",
        "",
    ]
    details = {"clean": clean, "mixed": mixed, "rss_mb": rss, "healthz": health}
    meta = {"command": command, "total_s": total_s, "machine": machine_info()}
    write_results(Path(args.out), "adversarial", figures, details, meta, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
