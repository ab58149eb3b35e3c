"""P/TTP tables (Markdown + CSV) and plots (per-round curves per method, per-client bars)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from feddpa.core.storage import RunDir  # noqa: E402
from feddpa.orchestrator.paired import paired  # noqa: E402

Summary = dict  # {"final": eval record, "curve": [[round, P, TTP], ...]}


def run_summary(run_dir: Path) -> Summary:
    """The final evaluation and the per-round curve of a run, from its metrics log."""
    run = RunDir(run_dir)
    if not run.metrics_file.is_file():
        raise FileNotFoundError(
            f"{run.path} has no {run.metrics_file.name}: nothing was trained there yet"
        )
    records = run.read_metrics()
    evals = [r for r in records if r.get("eval")]
    if not evals:
        raise ValueError(f"{run.metrics_file}: no evaluated round yet")
    curve = [[r["round"], r["eval"]["avg"]["P"], r["eval"]["avg"]["TTP"]] for r in evals]
    privacy: dict = next((r["privacy"] for r in reversed(records) if r.get("privacy")), {})
    return {"final": evals[-1]["eval"], "curve": curve, "records": evals, "privacy": privacy}


def privacy_line(summary: Summary) -> str:
    """The run's privacy in one sentence ('' when it ran without)."""
    p = summary.get("privacy") or {}
    if not p:
        return ""
    masks = "secure aggregation (the driver saw masked updates only)"
    where = masks if p.get("secure_aggregation") else "no secure aggregation"
    if "epsilon" not in p:
        return f"Privacy: {where}; no differential privacy (ε = ∞).\n"
    return (
        f"Privacy: client-level (ε, δ) = ({p['epsilon']:.3g}, {p['delta']:g}) on the global adapter "
        f"after {p.get('rounds_accounted', '?')} rounds (RDP accountant, dp-accounting); noise "
        f"multiplier {p.get('noise_multiplier', 0):.3g} added by the {p.get('noise', 'server')}, "
        f"clip {p.get('clip', 0):.3g}; {where}.\n"
    )


def with_global_alone(name: str, summary: Summary) -> dict[str, Summary]:
    """{name: summary}, and for a run whose evaluations also scored its global adapter alone
    (FedDPA-T: FedIT's trajectory) that as a second method read from the same run."""
    if "global_only" not in summary["final"]:
        return {name: summary}
    curve = [
        [r["round"], r["eval"]["global_only"]["avg"]["P"], r["eval"]["global_only"]["avg"]["TTP"]]
        for r in summary["records"]
        if "global_only" in r["eval"]
    ]
    alone = {
        "final": summary["final"]["global_only"],
        "curve": curve,
        "privacy": summary.get("privacy"),
    }
    return {name: summary, "global adapter alone (= FedIT)": alone}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def fedit_comparison(summary: Summary, item_tasks: list[str], name: str) -> str | None:
    """'NAME − FedIT: P +x.xx [lo, hi], TTP ...' (points, paired on the same test items, 95 %
    bootstrap interval over items), for a run that scored its global adapter alone beside the
    mix; None otherwise (or for records written before per-item scores were kept)."""
    final = summary["final"]
    alone = final.get("global_only")
    if alone is None or any("scores" not in c for c in final["clients"].values()):
        return None
    if any("scores" not in c for c in alone["clients"].values()):
        return None

    def runs(record: dict) -> list[dict]:
        return [
            {
                cid: {"task": c["tasks"][0], "scores": c["scores"]}
                for cid, c in record["clients"].items()
            }
        ]

    diff = paired(runs(final), runs(alone), item_tasks)
    cells = [
        f"{k} {100 * diff[k]['mean']:+.2f} [{100 * diff[k]['lo']:+.2f}, {100 * diff[k]['hi']:+.2f}]"
        for k in ("P", "TTP")
    ]
    return (
        f"{name} − FedIT (its global adapter alone), paired on the same items, 95 % interval: "
        + ", ".join(cells)
    )


def table_rows(summaries: dict[str, Summary]) -> list[dict]:
    """Long-format rows: method, client, tasks, P, TTP (plus one 'average' row per method)."""
    rows = []
    for method, s in summaries.items():
        for cid, c in s["final"]["clients"].items():
            rows.append(
                {
                    "method": method,
                    "client": cid,
                    "tasks": "+".join(c["tasks"]),
                    "P": c["P"],
                    "TTP": c["TTP"],
                }
            )
        avg = s["final"]["avg"]
        rows.append(
            {"method": method, "client": "average", "tasks": "", "P": avg["P"], "TTP": avg["TTP"]}
        )
    return rows


def markdown_table(summaries: dict[str, Summary]) -> str:
    methods = list(summaries)
    first = summaries[methods[0]]["final"]["clients"]
    head = "| client | task(s) | " + " | ".join(f"{m} P | {m} TTP" for m in methods) + " |"
    sep = "|---|---|" + "---:|---:|" * len(methods)
    lines = [head, sep]
    for cid, c in first.items():
        cells = []
        for m in methods:
            mc = summaries[m]["final"]["clients"][cid]
            cells += [_pct(mc["P"]), _pct(mc["TTP"])]
        tasks = ", ".join(c["tasks"]) if len(c["tasks"]) <= 2 else f"{len(c['tasks'])} tasks"
        lines.append(f"| {cid} | {tasks} | " + " | ".join(cells) + " |")
    avg = []
    for m in methods:
        a = summaries[m]["final"]["avg"]
        avg += [f"**{_pct(a['P'])}**", f"**{_pct(a['TTP'])}**"]
    lines.append("| **average** | | " + " | ".join(avg) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(summaries: dict[str, Summary], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, idx, label in ((axes[0], 1, "P (own task)"), (axes[1], 2, "TTP (all tasks)")):
        for n, (method, s) in enumerate(summaries.items()):
            xs = [r[0] + 1 for r in s["curve"]]
            # shrinking markers keep methods that share rounds visible (FedIT is FedDPA-F's
            # federated part): a later, smaller marker sits inside an earlier one
            ax.plot(
                xs,
                [100 * r[idx] for r in s["curve"]],
                label=method,
                marker="o",
                markersize=max(3.0, 10 - 1.5 * n),
                linestyle="--" if n % 2 else "-",
            )
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score (%)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_clients(summaries: dict[str, Summary], path: Path) -> None:
    methods = list(summaries)
    clients = list(summaries[methods[0]]["final"]["clients"])[:40]
    width = 0.8 / len(methods)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(clients) * 0.9), 7), sharex=True)
    for ax, key in zip(axes, ("P", "TTP"), strict=True):
        for i, m in enumerate(methods):
            vals = [100 * summaries[m]["final"]["clients"][c][key] for c in clients]
            ax.bar([j + i * width for j in range(len(clients))], vals, width, label=m)
        ax.set_ylabel(f"{key} (%)")
        ax.grid(axis="y", alpha=0.3)
    tasks = [task_label(summaries[methods[0]]["final"]["clients"][c]["tasks"]) for c in clients]
    labels = [f"{c}\n{t}" for c, t in zip(clients, tasks, strict=True)]
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(clients))], labels, fontsize=7)
    axes[1].set_xlabel("client")
    axes[0].legend(ncol=len(methods), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def task_label(tasks: list[str]) -> str:
    """A client's task(s) for a plot's axis: its task, or how many it holds."""
    return tasks[0][:18] if len(tasks) == 1 else f"{len(tasks)} tasks"


def weight_table(summary: Summary) -> str:
    """Per client: the mean weight its gate put on the local adapter, own-task vs other items."""
    lines = [
        "| client | task(s) | local weight, own items | local weight, other items |",
        "|---|---|---:|---:|",
    ]
    for cid, c in summary["final"]["clients"].items():
        tasks = ", ".join(c["tasks"]) if len(c["tasks"]) <= 2 else f"{len(c['tasks'])} tasks"
        own, other = c["local_weight_own"], c["local_weight_other"]
        lines.append(f"| {cid} | {tasks} | {own:.3f} | {other:.3f} |")
    return "\n".join(lines) + "\n"


def plot_weights(summary: Summary, path: Path) -> None:
    """Per client, the distribution of the local weight over its own-task and other items."""
    clients = list(summary["final"]["clients"].items())[:16]
    cols = min(4, len(clients))
    rows = (len(clients) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False)
    for ax, (cid, c) in zip(axes.flat, clients, strict=False):
        hist = c["local_weight_hist"]
        bins = len(hist["own"])
        xs = [(i + 0.5) / bins for i in range(bins)]
        for key, color in (("own", "tab:orange"), ("other", "tab:blue")):
            total = max(1, sum(hist[key]))
            ax.bar(xs, [n / total for n in hist[key]], 1 / bins, alpha=0.6, color=color, label=key)
        ax.set_title(f"client {cid}: {task_label(c['tasks'])}", fontsize=9)
        ax.set_xlim(0, 1)
    for ax in list(axes.flat)[len(clients) :]:
        ax.axis("off")
    axes[0][0].legend(fontsize=8)
    fig.supxlabel("weight on the local adapter")
    fig.supylabel("fraction of items")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(summaries: dict[str, Summary], out_dir: Path, title: str) -> str:
    """Write results.md, results.csv, curves.png, clients.png and, for a run whose clients mix
    two adapters, weights.png with the local-weight table; return the Markdown tables."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summaries)
    first = next(iter(summaries.values()))
    table += privacy_line(first) and "\n" + privacy_line(first)
    mixing = first["final"].get("weighting") not in (None, "global_only", "local_only")
    if mixing:
        table += "\nLocal weight per client (mean over items):\n\n" + weight_table(first)
        plot_weights(first, out_dir / "weights.png")
    (out_dir / "results.md").write_text(
        f"# {title}\n\nScores in %. P: own task(s); TTP: all tasks.\n\n{table}"
    )
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["method", "client", "tasks", "P", "TTP"])
        writer.writeheader()
        writer.writerows(table_rows(summaries))
    plot_curves(summaries, out_dir / "curves.png")
    plot_clients(summaries, out_dir / "clients.png")
    return table
