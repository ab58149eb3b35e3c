"""SmolLM2 served for real: generation cost of the dual adapters, then a trained SmolLM2 run behind
`feddpa serve`'s Ray Serve app on 127.0.0.1, called with the official `openai` client.

    .venv/bin/python benchmarks/serve_llm.py --run-dir RUN     # a SmolLM2 run (make run-llm)

1. Throughput of batched generation (`ServingEngine.run_batch`, 8 prompts of 4 clients, greedy,
   `--max-new-tokens`): the base model (adapters disabled) vs both adapters at a fixed weight vs both
   adapters with the run's instance-wise weighting (the gate). Target (issue 13): dynamic ÷ base
   >= 0.75 at batch 8. Variants interleaved, median of `--reps`.
2. HTTP: `/v1/completions` (plain and `stream=True`), `/v1/chat/completions` (streamed) through
   the openai client and `/v1/clients/{id}/generate`, for two clients on an item of their own task;
   `max_tokens` checked to bound the generated tokens (`usage.completion_tokens`).
Writes serve-llm.json and serve-llm.md into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")

import httpx2  # noqa: E402
import openai  # noqa: E402
import torch  # noqa: E402
from bench_common import machine_info, write_results  # noqa: E402
from serving import (  # noqa: E402
    Profile,
    interleaved_rps,
    own_task_items,
    serve_on_loopback,
    with_mode,
)

from feddpa.core.adapters import GLOBAL_ONLY  # noqa: E402
from feddpa.serving.deployment import ServeOptions  # noqa: E402
from feddpa.serving.engine import Request, ServingEngine  # noqa: E402

log = logging.getLogger("bench.serve_llm")


def throughput(run_dir: Path, new_tokens: int, reps: int) -> dict:
    engine = ServingEngine(str(run_dir))
    model = engine.model
    # every variant decodes exactly `new_tokens` steps per row (EOS suppressed until then): the
    # trained adapters answer in a few tokens where the base model rambles, and rows stop at EOS
    model.peft.generation_config.min_new_tokens = new_tokens  # type: ignore[attr-defined]
    reqs = own_task_items(run_dir, random.Random(0), per_client=2)
    by_client: dict[int, list[Request]] = {}
    for r in reqs:
        by_client.setdefault(r.client_id, []).append(r)
    chosen = [r for cid in sorted(by_client)[:4] for r in by_client[cid][:2]]  # 8 of 4 clients
    reqs = [Request(r.client_id, r.example, "generate", max_new_tokens=new_tokens) for r in chosen]
    examples = [r.example for r in reqs]
    texts: dict[str, list[str]] = {}

    def base() -> None:
        with torch.no_grad(), model.peft.disable_adapter():
            texts["base"] = model.generate(examples, GLOBAL_ONLY, max_new_tokens=new_tokens)  # type: ignore[attr-defined]

    def fixed() -> None:
        texts["fixed"] = [r.text for r in engine.run_batch(with_mode(reqs, "fixed"))]

    def gate() -> None:
        texts["gate"] = [r.text for r in engine.run_batch(with_mode(reqs, "gate"))]

    timing = Profile(warmup=1, reps=reps, loops=1)
    rps, rates = interleaved_rps({"base": base, "fixed": fixed, "gate": gate}, len(reqs), timing)
    tokens = dict.fromkeys(texts, len(reqs) * new_tokens)  # decode steps, every variant alike
    return {
        "batch": len(reqs),
        "clients_in_batch": len({r.client_id for r in reqs}),
        "max_new_tokens": new_tokens,
        "requests_per_s": rps,
        "requests_per_s_all": rates,
        "generated_tokens_per_batch": tokens,
        "ratio_gate_vs_base": rps["gate"] / rps["base"],
        "ratio_fixed_vs_base": rps["fixed"] / rps["base"],
        "threads": torch.get_num_threads(),
    }


def http_calls(run_dir: Path, max_tokens: int) -> dict:
    reqs = own_task_items(run_dir, random.Random(1), per_client=1)
    picked = [reqs[0], reqs[len(reqs) // 2]]
    out: dict = {"calls": []}
    t0 = time.perf_counter()
    with serve_on_loopback(ServeOptions(str(run_dir), cpus_per_replica=1)) as base_url:
        out["startup_s"] = time.perf_counter() - t0
        oa = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        for r in picked:
            model, prompt = f"client-{r.client_id}", r.example.instruction
            t = time.perf_counter()
            plain = oa.completions.create(model=model, prompt=prompt, max_tokens=max_tokens)
            plain_s = time.perf_counter() - t
            t, first = time.perf_counter(), None
            parts = []
            for chunk in oa.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, stream=True
            ):
                first = first if first is not None else time.perf_counter() - t
                parts.append(chunk.choices[0].text if chunk.choices else "")
            chat_parts = [
                c.choices[0].delta.content or ""
                for c in oa.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens,
                    stream=True,
                )
                if c.choices
            ]
            short = oa.completions.create(model=model, prompt=prompt, max_tokens=4)
            gen = httpx2.post(
                f"{base_url}/v1/clients/{r.client_id}/generate",
                json={"prompt": prompt, "max_tokens": max_tokens},
                timeout=300,
            ).json()
            out["calls"].append(
                {
                    "client": r.client_id,
                    "task": r.example.task,
                    "prompt": prompt,
                    "reference": r.example.output,
                    "completion": plain.choices[0].text,
                    "completion_s": plain_s,
                    "usage": plain.usage.model_dump() if plain.usage else None,
                    "stream_chunks": len(parts),
                    "stream_first_chunk_s": first,
                    "stream_equals_plain": "".join(parts) == plain.choices[0].text,
                    "chat_stream": "".join(chat_parts),
                    "max_tokens_4_completion_tokens": short.usage.completion_tokens
                    if short.usage
                    else None,
                    "generate": gen,
                }
            )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="a trained SmolLM2 run directory")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    run_dir = Path(args.run_dir)
    tp = throughput(run_dir, args.max_new_tokens, args.reps)
    log.info("throughput: %s", tp["requests_per_s"])
    calls = http_calls(run_dir, args.max_new_tokens)
    total_s = time.perf_counter() - t0
    command = "python benchmarks/serve_llm.py " + shlex.join(sys.argv[1:])
    figures = {
        "throughput_ratio_dynamic_vs_base_generate": (tp["ratio_gate_vs_base"], ">=", 0.75),
        "throughput_ratio_fixed_vs_base_generate": (tp["ratio_fixed_vs_base"], None, 0),
        "max_tokens_bounds_generation": (
            all(c["max_tokens_4_completion_tokens"] <= 4 for c in calls["calls"]),
            None,
            0,
        ),
        "stream_equals_plain": (all(c["stream_equals_plain"] for c in calls["calls"]), None, 0),
    }
    rps = tp["requests_per_s"]
    tok = tp["generated_tokens_per_batch"]
    lines = [
        "# SmolLM2-135M-Instruct served: generation cost and the HTTP / openai API",
        "",
        f"Command: `{command}` ({total_s / 60:.0f} min), run `{run_dir.name}`.",
        "",
        f"Batched generation, {tp['batch']} prompts of {tp['clients_in_batch']} clients, greedy, "
        f"up to {tp['max_new_tokens']} new tokens, {tp['threads']} torch threads "
        f"(median of {args.reps}, variants interleaved):",
        "",
        "| variant | requests/s | decoded tokens per batch | ÷ base |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {rps[key]:.3f} | {tok.get(key, 0)} | {rps[key] / rps['base']:.2f} |"
            for name, key in (
                ("base model (adapters off)", "base"),
                ("dual adapters, fixed weight", "fixed"),
                ("dual adapters, the gate (per-row weights)", "gate"),
            )
        ),
        "",
        "Target: dual dynamic ÷ base ≥ 0.75 at batch 8 "
        f"(measured {tp['ratio_gate_vs_base']:.2f}). EOS is suppressed until the last step "
        "(`min_new_tokens`), so every variant decodes the same number of tokens: the trained "
        "adapters would otherwise stop after a few tokens where the base model goes on.",
        "",
        f"Through Ray Serve (1 replica, start-up {calls['startup_s']:.0f} s) with the `openai` "
        "client:",
        "",
        "| client (task) | prompt (start) | reference | completion | chat (streamed) "
        "| stream = plain | usage | tokens with max_tokens=4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in calls["calls"]:
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:120]  # noqa: E731
        usage = c["usage"] or {}
        lines.append(
            f"| {c['client']} ({c['task']}) | {cell(c['prompt'][:80])}… | {cell(c['reference'])} "
            f"| {cell(c['completion'])} | {cell(c['chat_stream'])} | {c['stream_equals_plain']} "
            f"| {usage.get('prompt_tokens')} + {usage.get('completion_tokens')} "
            f"| {c['max_tokens_4_completion_tokens']} |"
        )
    lines.append("")
    details = {"throughput": tp, "http": calls}
    meta = {"command": command, "total_s": total_s, "machine": machine_info()}
    write_results(Path(args.out), "serve-llm", figures, details, meta, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
