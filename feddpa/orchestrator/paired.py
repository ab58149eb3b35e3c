"""Paired differences between two methods on the same test items, with a bootstrap interval.

Both methods are scored on the same items (the test split is the same for every seed and
method), so the difference is taken item by item and the items are resampled (stratified by
task, the same resample for every seed and client), which is the interval of the mean difference
a new draw of test items would give. Seeds are averaged inside each resample.

Inputs are per seed, per client: {"task": own task, "scores": [per test item]}, with `tasks`
the task of each test item (the same list for every client).
"""

from __future__ import annotations

import numpy as np

Runs = list[dict[str, dict]]  # per seed: client id -> {"task": str, "scores": [float]}


def _diffs(a: Runs, b: Runs) -> np.ndarray:
    """(seeds, clients, items) of a − b, clients in sorted id order."""
    out = []
    for run_a, run_b in zip(a, b, strict=True):
        ids = sorted(run_a)
        if ids != sorted(run_b):
            raise ValueError(f"the two runs hold different clients: {ids} vs {sorted(run_b)}")
        out.append([np.subtract(run_a[c]["scores"], run_b[c]["scores"]) for c in ids])
    return np.asarray(out, dtype=float)


def _own_mask(runs: Runs, tasks: list[str]) -> np.ndarray:
    """(clients, items): item i is client c's own task (from the first seed's clients)."""
    first = runs[0]
    return np.asarray([[t == first[c]["task"] for t in tasks] for c in sorted(first)])


def paired(
    a: Runs, b: Runs, tasks: list[str], resamples: int = 2000, seed: int = 0
) -> dict[str, dict]:
    """{"P": {...}, "TTP": {...}, "per_task": {task: {...}}} of a − b, each {mean, lo, hi}
    (95 % percentile bootstrap). P: each client on its own task's items; TTP: every client on
    every item; per task: P of that task's client(s)."""
    d = _diffs(a, b)  # (S, C, N)
    own = _own_mask(a, tasks)  # (C, N)
    task_arr = np.asarray(tasks)
    strata = [np.flatnonzero(task_arr == t) for t in sorted(set(tasks))]
    rng = np.random.default_rng(seed)
    draws = [np.arange(len(tasks))] + [
        np.concatenate([rng.choice(s, size=len(s)) for s in strata]) for _ in range(resamples)
    ]

    def stats(idx: np.ndarray) -> dict[str, float]:
        sub, mask = d[:, :, idx], own[:, idx]  # (S, C, n), (C, n)
        p_client = (sub * mask).sum(2) / np.maximum(mask.sum(1), 1)  # (S, C)
        out = {"P": float(p_client.mean()), "TTP": float(sub.mean())}
        for t in sorted(set(tasks)):
            keep = mask & (task_arr[idx] == t)  # (C, n)
            owners = keep.any(1)
            vals = (sub * keep).sum(2)[:, owners] / keep.sum(1)[owners]
            out[f"task:{t}"] = float(vals.mean()) if owners.any() else float("nan")
        return out

    point, boot = stats(draws[0]), [stats(i) for i in draws[1:]]
    result: dict[str, dict] = {"per_task": {}}
    for key, value in point.items():
        lo, hi = np.percentile([b[key] for b in boot], [2.5, 97.5])
        entry = {"mean": value, "lo": float(lo), "hi": float(hi)}
        if key.startswith("task:"):
            result["per_task"][key.removeprefix("task:")] = entry
        else:
            result[key] = entry
    return result
