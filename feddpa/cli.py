"""`feddpa train | eval | serve | tokens | data` — the command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from feddpa.core.config import ConfigError, ExperimentConfig, load_config
from feddpa.core.storage import RunDir, RunLocked


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def setup_logging(run_dir: Path | None, verbose: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    handlers[0].setLevel(logging.INFO if verbose else logging.WARNING)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(RunDir(run_dir).log_file)
        file_handler.setLevel(logging.INFO)
        handlers.append(file_handler)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def default_run_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.output_dir) / f"{cfg.name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def print_results(run_dir: Path, title: str) -> None:
    from feddpa.datasets import read_manifest, read_test
    from feddpa.orchestrator.report import (
        fedit_comparison,
        run_summary,
        with_global_alone,
        write_report,
    )

    run = RunDir(run_dir)
    summary = run_summary(run_dir)
    table = write_report(with_global_alone(title, summary), run.results_dir, title)
    print(f"\n{title} — P (own task) and TTP (all tasks), %\n\n{table}")
    data = str(run.data_dir)
    item_tasks = [ex.task for ex in read_test(data, read_manifest(data))]
    if (line := fedit_comparison(summary, item_tasks, title)) is not None:
        print(line)
    print(f"tables and plots: {run.results_dir}")


def resumed_executor(run_dir: Path, ray_arg: str | None, in_process: bool) -> str | None:
    """The Ray address to resume with: as the run was started (RUN/execution.json) unless
    --ray or --in-process says otherwise. The in-process and Ray paths run torch with different
    thread counts, so only a run resumed the way it started is bit-identical."""
    if in_process:
        return None
    if ray_arg is not None:
        return ray_arg
    run = RunDir(run_dir)
    found, started = run.read_execution()
    if not found:
        print(
            f"feddpa: {run.execution_file} is missing (a run from an older version): resuming "
            "in-process; pass --ray ADDRESS if it ran on Ray",
            file=sys.stderr,
        )
        return None
    how = f"on Ray ({started})" if started else "in-process"
    print(f"resuming {run_dir} {how}, as it was started", file=sys.stderr)
    return started


def cmd_train(args: argparse.Namespace) -> int:
    from feddpa.orchestrator.executor import InProcessExecutor
    from feddpa.orchestrator.loop import train

    if args.resume:
        run_dir = Path(args.resume)
        cfg = RunDir(run_dir).read_config()
        args.ray = resumed_executor(run_dir, args.ray, args.in_process)
    else:
        cfg = load_config(args.config, args.set)
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
        run = RunDir(run_dir)
        with run.lock():  # nothing is written into a run directory another process holds
            run.ensure_new()
            run.write_execution(args.ray)
    setup_logging(run_dir, args.verbose)
    start = time.perf_counter()
    if args.ray:
        from feddpa.orchestrator.driver import train_on_ray

        if not args.resume:
            cfg = cfg.with_absolute_paths()
        train_on_ray(cfg, run_dir, resume=bool(args.resume), address=args.ray)
    else:
        train(cfg, run_dir, InProcessExecutor, resume=bool(args.resume))
    print_results(run_dir, cfg.method)
    print(f"run directory: {run_dir} ({time.perf_counter() - start:.0f} s)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from feddpa.orchestrator.reevaluate import reevaluate

    run_dir = Path(args.run_dir)
    setup_logging(None, args.verbose)
    out = reevaluate(run_dir, args.set, Path(args.out) if args.out else None)
    print(out)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from feddpa.datasets import read_manifest
    from feddpa.datasets.prepare import prepare_shards

    if args.data_cmd == "prepare":
        cfg = load_config(args.config, args.set)
        manifest = prepare_shards(cfg.data, Path(args.out), model_kind=cfg.model.kind)
    else:
        manifest = read_manifest(args.dir)
    sizes = [c.num_examples for c in manifest.clients]
    print(
        json.dumps(
            {
                "clients": len(sizes),
                "train_examples": sum(sizes),
                "min_client": min(sizes),
                "max_client": max(sizes),
                "test_examples": manifest.test.num_examples,
                "test_tasks": manifest.test.tasks,
            },
            indent=2,
        )
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from feddpa.orchestrator.driver import init_ray
    from feddpa.serving.auth import TokenStore
    from feddpa.serving.deployment import ServeOptions, start
    from feddpa.serving.limits import Limits

    run_dir = Path(args.run_dir).resolve()
    options = ServeOptions(
        run_dir=str(run_dir),
        capacity=args.capacity,
        replicas=args.replicas,
        gpus_per_replica=args.gpus_per_replica,
        max_batch_size=args.max_batch_size,
        tokens=str(Path(args.tokens).resolve()) if args.tokens else None,
        limits=Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)}),
    )
    setup_logging(None, args.verbose)
    check_exposure(args.host, options.tokens, args.insecure_no_auth)
    if options.tokens is not None:
        TokenStore.load(options.tokens)  # a bad file fails here, naming itself, not per request
    else:
        print(
            "feddpa: warning: no --tokens file, every client is open to anyone who can reach the port",
            file=sys.stderr,
        )
    init_ray(args.ray)
    start(options, host=args.host, port=args.port)
    print(f"serving {run_dir} on http://{args.host}:{args.port} (Ctrl-C to stop)")
    signal.signal(signal.SIGTERM, interrupted)  # `ray job stop` and process managers send it
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop(own_ray=args.ray == "local")
    return 0


def interrupted(signum: int, _frame: object) -> None:
    """SIGTERM ends the serving loop as Ctrl-C does (Python's default would exit at once,
    leaving the app deployed on a cluster that outlives this process)."""
    raise KeyboardInterrupt(f"signal {signum}")


def stop(own_ray: bool) -> None:
    """Delete the app; shut Serve down too when this process started the Ray it runs on (a
    joined cluster's Serve may hold other applications)."""
    from ray import serve

    from feddpa.serving.deployment import APP_NAME

    serve.delete(APP_NAME)
    if own_ray:
        serve.shutdown()
    print(f"feddpa: stopped serving ({APP_NAME} deleted)", file=sys.stderr)


def check_exposure(host: str, tokens: str | None, insecure: bool) -> None:
    """Refuse to serve every client without authentication beyond this machine."""
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if not loopback and tokens is None and not insecure:
        raise ValueError(
            f"--host {host} exposes every client beyond this machine without authentication: "
            "create tokens (feddpa tokens RUN_DIR --out tokens.json) and pass --tokens "
            "tokens.json, bind 127.0.0.1, or pass --insecure-no-auth if the network is private"
        )


def cmd_tokens(args: argparse.Namespace) -> int:
    from feddpa.serving.auth import create_tokens

    latest = RunDir(args.run_dir).latest()
    if latest is None:
        raise FileNotFoundError(f"{args.run_dir} has no committed round")
    clients = latest.client_ids()
    plain = create_tokens(clients, Path(args.out))
    print(json.dumps(plain, indent=2))
    print(f"hashes written to {args.out}; the tokens above are shown once", file=sys.stderr)
    return 0


def add_set(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def add_limits(parser: argparse.ArgumentParser) -> None:
    """One flag per serving limit (`--max-options`, ...), default and help from `Limits`."""
    from dataclasses import fields

    from feddpa.serving.limits import Limits

    for f in fields(Limits):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            metavar="N",
            help=f"{f.metadata['doc']} (default {f.default})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="feddpa",
        description="Federated fine-tuning with FedDPA dual adapters (global + local LoRA, "
        "instance-wise weighting), evaluated by P (own task) and TTP (all tasks).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO to the console")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="train a method and evaluate it (writes a run directory)")
    p.add_argument("--config", help="experiment YAML (configs/*.yaml); defaults if omitted")
    add_set(p, "override a config key, e.g. --set federation.rounds=5 (repeatable)")
    p.add_argument(
        "--run-dir", help="where to write the run (default: OUTPUT_DIR/NAME-METHOD-TIME)"
    )
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a killed run from its last committed round"
    )
    p.add_argument(
        "--ray",
        metavar="local|auto|ADDRESS",
        help="run clients in Ray actors: 'local' starts Ray on 127.0.0.1, 'auto' or an address "
        "joins a running cluster (default: every client in this process; with --resume: "
        "as the run was started)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="with --resume: continue in this process even if the run was started on Ray",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval", help="re-evaluate a run's latest checkpoint (optionally with another weighting)"
    )
    p.add_argument("run_dir")
    add_set(p, "override weighting.* or eval.* keys, e.g. --set weighting.mode=sample")
    p.add_argument(
        "--out", help="directory for the tables and plots (default: RUN_DIR/results-eval)"
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "serve", help="serve every client's personalized model over HTTP (Ray Serve)"
    )
    p.add_argument("run_dir", help="a training run directory (serves its latest committed round)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tokens", help="tokens file of hashes (feddpa tokens); without it auth is off")
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow a non-loopback --host without --tokens (every client open to the network)",
    )
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="for runs trained on GPU")
    p.add_argument("--capacity", type=int, default=128, help="clients resident per replica (LRU)")
    p.add_argument("--max-batch-size", type=int, default=16)
    add_limits(p)
    p.add_argument("--ray", default="local", metavar="local|auto|ADDRESS")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("tokens", help="create bearer tokens for a run's clients (prints them once)")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="new file for the token hashes")
    p.set_defaults(func=cmd_tokens)

    p = sub.add_parser("data", help="prepare or inspect per-client Parquet shards")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    q = dsub.add_parser(
        "prepare", help="write client shards + manifest for a config's data section"
    )
    q.add_argument("--config")
    add_set(q, "override a config key (repeatable)")
    q.add_argument("--out", required=True, help="new directory for the shards")
    q = dsub.add_parser("inspect", help="summarise a shard directory's manifest")
    q.add_argument("dir")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError, RunLocked) as err:
        print(f"feddpa: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
