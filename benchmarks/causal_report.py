"""The causal benchmark's markdown: methods, paired differences with intervals, per task, the
gate's trust and weights, learnability, and where the time went."""

from __future__ import annotations

import json
import statistics


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def interval(entry: dict) -> str:
    return f"{100 * entry['mean']:+.2f} [{100 * entry['lo']:+.2f}, {100 * entry['hi']:+.2f}]"


def render(result: dict) -> str:
    methods, tasks = result["methods"], sorted(result["zero_shot"])
    seeds = result["seeds"]
    lines = [
        "# Quality on a real LLM: SmolLM2-135M-Instruct, dataset 1, all eight tasks, ROUGE-1",
        "",
        f"Command: `{result['command']}`. Setting: `{result['config']}`"
        + (f" with `{' '.join(result['overrides'])}`" if result["overrides"] else "")
        + f"; {result['test_per_task']} test items per task (TTP over "
        f"{8 * result['test_per_task']} items per client), seeds {seeds}.",
        "",
        "| method | P | TTP | P per seed | TTP per seed |",
        "|---|---:|---:|---|---|",
    ]
    for m, v in methods.items():
        per = [" / ".join(pct(x) for x in v[k]["per_seed"]) for k in ("P", "TTP")]
        lines.append(
            f"| {m} | {pct(v['P']['mean'])} | {pct(v['TTP']['mean'])} | {per[0]} | {per[1]} |"
        )
    lines += [
        "",
        "Paired differences (points of ROUGE-1, same items; 95 % bootstrap interval over test "
        "items, stratified by task, seeds averaged):",
        "",
        "| comparison | P | TTP |",
        "|---|---|---|",
    ]
    for name, d in result["paired"].items():
        lines.append(
            f"| {name.replace('_vs_', ' − ')} | {interval(d['P'])} | {interval(d['TTP'])} |"
        )
    lines += [
        "",
        "P per task (each task's client on its own items, mean over seeds) and zero-shot:",
        "",
        "| | " + " | ".join(tasks) + " |",
        "|---|" + "---:|" * len(tasks),
        "| zero-shot | " + " | ".join(pct(result["zero_shot"][t]) for t in tasks) + " |",
    ]
    for m, v in methods.items():
        lines.append(f"| {m} | " + " | ".join(pct(v["P_per_task"][t]) for t in tasks) + " |")
    for name in ("feddpa_t_vs_fedit", "feddpa_f_vs_fedit"):
        per = result["paired"][name]["per_task"]
        lines.append(
            f"| {name.replace('_vs_', ' − ')} | "
            + " | ".join(
                f"{100 * per[t]['mean']:+.1f} [{100 * per[t]['lo']:+.1f}, "
                f"{100 * per[t]['hi']:+.1f}]"
                for t in tasks
            )
            + " |"
        )
    lines += [
        "",
        "The gate per client (mean over seeds): trust t chosen on the client's validation slice "
        "(0 = served by the global adapter alone), mean local weight on its own task's items and "
        "on other tasks' items.",
        "",
        "| method | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for m in ("feddpa_t", "feddpa_f"):
        cells = []
        for t in tasks:
            trust, own, other = [], [], []
            for seed in seeds:
                prof = result["profile"][str(seed)]
                for cid, c in result["gate"][m][str(seed)].items():
                    if c["task"] == t:
                        trust.append(prof["trust"][m].get(cid, float("nan")))
                        own.append(c["local_weight_own"])
                        other.append(c["local_weight_other"])
            cells.append(
                f"t {statistics.mean(trust):.2f}, own {statistics.mean(own):.2f}, "
                f"other {statistics.mean(other):.2f}"
            )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Where the time went (per seed):", ""]
    lines += [
        "| seed | wall (min) | run | fit (s) | eval (s) | train tokens/s | of matmul limit |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for seed, prof in result["profile"].items():
        wall = prof["wall_s"]
        for name, r in prof["runs"].items():
            lines.append(
                f"| {seed} | {'' if wall is None else f'{wall / 60:.1f}'} | {name} | "
                f"{r['fit_s']:.0f} | {r['eval_s']:.0f} | {r['train_tokens_per_s']:.0f} | "
                f"{r['train_fraction_of_matmul_limit']:.2f} |"
            )
        wall = None
    first = next(iter(result["profile"].values()))
    lines += [
        "",
        f"`torch.matmul` fp32 limit ({first.get('matmul_source', 'measured by this report')}): "
        f"{first['matmul_gflops']:.0f} GFLOP/s on {result['threads']} threads. Padding share "
        "of training batches: "
        f"{json.dumps({k: round(v, 3) for k, v in first['padding_share'].items()})}.",
    ]
    return "\n".join(lines) + "\n"
