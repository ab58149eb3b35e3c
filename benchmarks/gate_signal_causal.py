"""Which representation should the gate use with a causal LM? Own-vs-other ROC-AUC of the gate's
kNN score (mean of the top-5 cosines to the client's bank of training prompts) per client, for the
frozen model's hidden states: the last prompt token (the paper's choice) or the mean over the
prompt's tokens, at the final or the middle layer.

    python benchmarks/gate_signal_causal.py RUN_DIR      # a causal run (its data and config)

Held-out training data only, never the test split: each client's bank is its training part, the
queries are every client's validation slice (`data.validation_fraction`, split as the hosts split
it). Only the frozen model is read (no adapter), so the run's checkpoints do not matter.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_common import machine_info, write_results
from gate_signal import ranked_table
from sklearn.metrics import roc_auc_score

from feddpa.actors.host import ClientHost
from feddpa.core.adapters import mixed
from feddpa.core.config import load_config
from feddpa.core.evaluation import NO_ADAPTER, chunks
from feddpa.core.weighting import cosine_matrix, knn_scores
from feddpa.datasets import read_manifest

TOPK = 5


@torch.no_grad()
def hidden(model, texts: list[str]) -> dict[str, torch.Tensor]:
    """{"layer/pooling": (N, H)} of the frozen model for the final and middle layers."""
    out: dict[str, list[torch.Tensor]] = {}
    for batch_texts in chunks(texts, 16):
        batch = model._prompt_batch(batch_texts)  # left-padded, as the gate's own pass
        with mixed(model.peft, NO_ADAPTER):
            states = model.peft(**batch, output_hidden_states=True, logits_to_keep=1).hidden_states
        mask = batch["attention_mask"].unsqueeze(-1).float()
        for name, h in (("final", states[-1]), ("middle", states[len(states) // 2])):
            h = h.float()
            out.setdefault(f"{name}/last", []).append(h[:, -1])
            out.setdefault(f"{name}/mean", []).append((h * mask).sum(1) / mask.sum(1))
    return {k: torch.cat(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="gate-signal-causal")
    args = ap.parse_args()
    start = time.perf_counter()
    cfg = load_config(args.run_dir / "config.yaml")
    data = str(args.run_dir / "data")
    manifest = read_manifest(data)
    host = ClientHost(cfg, data, manifest.client_ids)  # the train / validation split of a run
    model = host.model
    test = [ex for state in host.clients.values() for ex in state.validation]
    queries = hidden(model, [model.query_text(e) for e in test])
    per_client: dict[str, dict[str, float]] = {}
    for info in manifest.clients:
        train = host.clients[info.client_id].data
        bank = hidden(model, [model.query_text(e) for e in train])
        labels = [e.task in info.tasks for e in test]
        per_client[sorted(info.tasks)[0]] = {
            k: float(roc_auc_score(labels, knn_scores(cosine_matrix(queries[k], bank[k]), TOPK)))
            for k in queries
        }
    summary, ranked, rows = ranked_table(per_client, "layer/pooling")
    lines = [
        f"# Gate signal with a causal LM: own-vs-other ROC-AUC ({cfg.model.path}, frozen model)",
        "",
        f"Command: `python benchmarks/gate_signal_causal.py {args.run_dir}`. Score: mean of the "
        f"top-{TOPK} cosines to the client's training prompts; queries: the {len(test)} "
        "validation items of all clients (held out of training; no test item).",
        "",
        *rows,
    ]
    meta = {**machine_info(), "total_s": time.perf_counter() - start, "run_dir": str(args.run_dir)}
    figures = {"best_mean_auc": (summary[ranked[0]]["mean"], None, None)}
    write_results(
        args.out,
        args.name,
        figures,
        {"per_client": per_client, "summary": summary},
        meta,
        "\n".join(lines) + "\n",
    )
    print("\n".join(lines))
    print(json.dumps(summary[ranked[0]]))


if __name__ == "__main__":
    main()
