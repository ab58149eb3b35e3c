"""Round checkpoints: commit, then continue.

    RUN/checkpoints/round_00003/   global/ (PEFT adapter)  clients/client_00007/{local/, bank.safetensors}
                                   state.json  metrics.json
    RUN/checkpoints/LATEST         name of the newest committed round

Hosts write the clients they changed into `.stage_00003/` (the round being committed); the driver
hard-links every unchanged client from the previous round (each round directory is complete on its
own), writes the global adapter and state, fsyncs and renames the stage into place, then replaces
LATEST atomically.
A crash at any point leaves the previous round intact; a stale stage is discarded on resume.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from peft import LoraConfig

from feddpa.core.adapters import AdapterState
from feddpa.core.storage import (
    LATEST,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    fsync_tree,
    latest_checkpoint,
    load_adapter,
    round_name,
    save_adapter,
    stage_dir,
)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of src into dst (copy where links are not supported)."""
    for path in src.rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)


class Checkpoints:
    def __init__(self, root: Path, keep: int) -> None:
        self.root = root
        self.keep = keep
        root.mkdir(parents=True, exist_ok=True)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def state(self, path: Path) -> dict:
        return json.loads((path / "state.json").read_text())

    def global_state(self, path: Path) -> AdapterState:
        return load_adapter(path / "global")

    def stage(self, step: int) -> Path:
        stage = stage_dir(self.root, step)
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        return stage

    def commit(
        self,
        step: int,
        stage: Path,
        global_state: AdapterState,
        config: LoraConfig,
        state: dict,
        metrics: dict,
        reported: set[int] | None = None,
    ) -> Path:
        """Commit the stage as round `step`. Of the staged clients only those in `reported` are
        taken (a client that failed or timed out may have staged files: they are dropped); every
        other client is carried forward from the previous round."""
        if reported is not None:
            self.drop_unreported(stage, reported)
        previous = self.latest()
        if previous is not None and (previous / "clients").is_dir():
            for cdir in (previous / "clients").iterdir():
                if not (stage / "clients" / cdir.name).exists():
                    _link_tree(cdir, stage / "clients" / cdir.name)
        save_adapter(global_state, config, stage / "global")
        atomic_write_json(stage / "metrics.json", metrics)
        atomic_write_json(stage / "state.json", state)
        fsync_tree(stage)
        final = self.root / round_name(step)
        if final.exists():  # a committed round being redone after LATEST moved back: never mix
            shutil.rmtree(final)
        os.rename(stage, final)
        fsync_dir(self.root)
        atomic_write_bytes(self.root / LATEST, final.name.encode())
        self._prune()
        return final

    @staticmethod
    def drop_unreported(stage: Path, reported: set[int]) -> None:
        """Remove staged files of clients that did not report (and half-staged temp dirs)."""
        if not (stage / "clients").is_dir():
            return
        for cdir in (stage / "clients").iterdir():
            if cdir.name.startswith(".") or int(cdir.name.split("_")[1]) not in reported:
                shutil.rmtree(cdir)

    def _prune(self) -> None:
        rounds = sorted(p for p in self.root.glob("round_*") if p.is_dir())
        for old in rounds[: -self.keep]:
            shutil.rmtree(old)
        for stale in self.root.glob(".stage_*"):
            shutil.rmtree(stale)
