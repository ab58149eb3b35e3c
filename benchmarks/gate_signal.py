"""Which representation should the gate use? ROC-AUC of own-task vs other-task test inputs, per
client, for each choice of representation, scored as the gate scores them (mean of the top-5
cosines to the client's bank of training prompts).

Choices: the adapter setting (the client's local adapter alone, as the paper, or the frozen base
model), the layer (final, middle, the token embeddings), the pooling (mean over tokens or the
first token) and the text (the instruction alone, as the bank stores it, or the whole prompt with
its options). Multiple-choice (encoder) runs only.

    python benchmarks/gate_signal.py RUN_DIR            # writes benchmarks/results/gate-signal.*
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_common import machine_info, write_results
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from feddpa.core.adapters import LOCAL, LOCAL_ONLY, Mix, load_adapter_state, mixed
from feddpa.core.config import load_config
from feddpa.core.evaluation import chunks
from feddpa.core.models import build_task_model
from feddpa.core.records import Example
from feddpa.core.storage import client_dir, latest_checkpoint, load_adapter
from feddpa.core.weighting import cosine_matrix, knn_scores
from feddpa.datasets import read_manifest, read_shard, read_test

BASE = Mix(0.0, 0.0)  # neither adapter: the frozen foundation model
SETTINGS = {"local": LOCAL_ONLY, "base": BASE}
TOPK = 5


def hidden_states(model, texts: list[str], mix: Mix) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's hidden states (L+1 of (B, T, H)) and the attention mask (B, T, 1)."""
    batch = model.tokenizer(
        texts, padding=True, truncation=True, max_length=model.max_length, return_tensors="pt"
    )
    with torch.no_grad(), mixed(model.peft, mix):
        out = model.peft(**batch, output_hidden_states=True)
    return list(out.hidden_states), batch["attention_mask"].unsqueeze(-1).float()


def representations(model, texts: list[str], mix: Mix) -> dict[str, torch.Tensor]:
    """{"layer/pooling": (N, H)} for the final, middle and embedding layers, mean or first token."""
    out: dict[str, list[torch.Tensor]] = {}
    for batch in chunks(texts, 64):
        layers, mask = hidden_states(model, batch, mix)
        picks = {"final": layers[-1], "middle": layers[len(layers) // 2], "embed": layers[0]}
        for name, h in picks.items():
            out.setdefault(f"{name}/mean", []).append((h * mask).sum(1) / mask.sum(1))
            out.setdefault(f"{name}/first", []).append(h[:, 0])
    return {k: torch.cat(v) for k, v in out.items()}


def client_aucs(model, data: list[Example], test: list[Example], own: set[str]) -> dict:
    labels = [ex.task in own for ex in test]
    aucs = {}
    for setting, mix in SETTINGS.items():
        for text_name in ("instruction", "prompt"):

            def pick(ex: Example, text_name: str = text_name) -> str:
                return ex.stem if text_name == "instruction" else ex.instruction

            bank = representations(model, [pick(e) for e in data], mix)
            queries = representations(model, [pick(e) for e in test], mix)
            for rep, q in queries.items():
                scores = knn_scores(cosine_matrix(q, bank[rep]), TOPK)
                aucs[f"{setting}/{rep}/{text_name}"] = float(roc_auc_score(labels, scores))
    return aucs


def ranked_table(
    per_client: dict[str, dict[str, float]], what: str, prefix: str = ""
) -> tuple[dict[str, dict[str, float]], list[str], list[str]]:
    """(per choice {mean, min} over clients, choices best first, the Markdown table's rows)."""
    choices = sorted(next(iter(per_client.values())))
    summary = {
        c: {
            "mean": statistics.mean(v[c] for v in per_client.values()),
            "min": min(v[c] for v in per_client.values()),
        }
        for c in choices
    }
    ranked = sorted(choices, key=lambda c: -summary[c]["mean"])
    rows = [
        f"| {what} | mean AUC | worst client | "
        + " | ".join(f"{prefix}{c}" for c in per_client)
        + " |",
        "|---|---:|---:|" + "---:|" * len(per_client),
    ]
    for c in ranked:
        cells = " | ".join(f"{v[c]:.3f}" for v in per_client.values())
        rows.append(f"| {c} | {summary[c]['mean']:.3f} | {summary[c]['min']:.3f} | {cells} |")
    return summary, ranked, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="gate-signal")
    args = parser.parse_args()
    start = time.perf_counter()

    cfg = load_config(args.run_dir / "config.yaml")
    if cfg.model.kind != "multiple_choice":
        raise SystemExit(f"{args.run_dir}: gate_signal.py measures multiple-choice runs only")
    data_dir = str(args.run_dir / "data")
    manifest = read_manifest(data_dir)
    test = read_test(data_dir, manifest)
    checkpoint = latest_checkpoint(args.run_dir / "checkpoints")
    if checkpoint is None:
        raise SystemExit(f"{args.run_dir}: no committed round")
    model = build_task_model(cfg.model, cfg.lora, cfg.eval)
    per_client = {}
    for info in tqdm(manifest.clients, desc="clients"):
        cdir = client_dir(checkpoint, info.client_id)
        load_adapter_state(model.peft, LOCAL, load_adapter(cdir / "local"))
        data = read_shard(data_dir, info)
        per_client[str(info.client_id)] = client_aucs(model, data, test, set(info.tasks))
    summary, ranked, rows = ranked_table(
        per_client, "representation (adapter/layer/pooling/text)", "client "
    )
    lines = [
        f"# Gate signal: ROC-AUC own vs other test inputs ({args.run_dir.name}, {checkpoint.name})",
        "",
        f"Score: mean of the top-{TOPK} cosines to the client's training prompts. Command: "
        f"`python benchmarks/gate_signal.py {args.run_dir}`",
        "",
        *rows,
    ]
    figures = {"best_mean_auc": (summary[ranked[0]]["mean"], None, None)}
    details = {"per_client": per_client, "summary": summary, "ranked": ranked}
    meta = {
        **machine_info(),
        "total_s": time.perf_counter() - start,
        "run_dir": str(args.run_dir),
        "checkpoint": checkpoint.name,
    }
    write_results(args.out, args.name, figures, details, meta, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(summary[ranked[0]]))


if __name__ == "__main__":
    main()
