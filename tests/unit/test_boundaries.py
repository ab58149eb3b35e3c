"""Boundaries the import-linter contracts (pyproject.toml, run by `make lint`) cannot state:
importing core at run time loads neither ray nor deepspeed; importing the serving app builds no
app; core's adapters know no stack of clients; only core/storage.py spells the run directory's
names; only core/algorithms.py decides by a method's name."""

from __future__ import annotations

import ast
import atexit
import json
import subprocess
import sys
from pathlib import Path

import feddpa

PACKAGE = Path(feddpa.__file__).resolve().parent
CORE_MODULES = [
    "feddpa.core",
    "feddpa.core.adapters",
    "feddpa.core.weighting",
    "feddpa.core.fedavg",
    "feddpa.core.evaluation",
    "feddpa.core.models",
    "feddpa.core.models.mc",
    "feddpa.core.models.causal",
    "feddpa.core.storage",
    "feddpa.core.algorithms",
    "feddpa.core.training",
    "feddpa.core.config",
    "feddpa.core.records",
]


# A fresh interpreter importing all of core costs seconds (torch, transformers, peft); start it at
# collection so it runs on the second core while the other tests run, and read it in the test.
_CHILD = subprocess.Popen(
    [
        sys.executable,
        "-c",
        "import importlib, json, sys\n"
        f"for m in {CORE_MODULES!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('ray', 'deepspeed'))))\n",
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
)
# Importing every serving module (torch, fastapi, ray) costs seconds too: started here as well.
_SERVING_CHILD = subprocess.Popen(
    [
        sys.executable,
        "-c",
        "import importlib, json, pkgutil, sys, fastapi, feddpa.serving\n"
        "built = []\n"
        "init = fastapi.FastAPI.__init__\n"
        "def counted(self, *args, **kwargs):\n"
        "    built.append(sys._getframe(1).f_globals.get('__name__'))\n"
        "    init(self, *args, **kwargs)\n"
        "fastapi.FastAPI.__init__ = counted\n"
        "for m in pkgutil.iter_modules(feddpa.serving.__path__, 'feddpa.serving.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(json.dumps(built))\n",
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
)
atexit.register(lambda: _CHILD.poll() is None and _CHILD.kill())
atexit.register(lambda: _SERVING_CHILD.poll() is None and _SERVING_CHILD.kill())


def imported_modules(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved from `root`)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    package = parts if path.name == "__init__.py" else parts[:-1]
    if package and package[-1] == "__init__":
        package = package[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def sources(under: str = "") -> list[Path]:
    return sorted((PACKAGE / under).rglob("*.py"))


def test_importing_core_loads_neither_ray_nor_deepspeed():
    out, err = _CHILD.communicate(timeout=180)
    assert _CHILD.returncode == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_importing_the_serving_modules_builds_no_app():
    """The app is built by `build_app` in each Serve replica, never at import (a module-level app
    over a module-level state before)."""
    out, err = _SERVING_CHILD.communicate(timeout=180)
    assert _SERVING_CHILD.returncode == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_core_adapters_know_no_stack_of_clients():
    """The per-row stack of clients' local adapters is serving's: core's adapters reach it only
    through the `RowRoute` hook (they imported each other before)."""
    assert not (PACKAGE / "core" / "stack.py").exists()
    feddpa_imports = [
        n for n in imported_modules(PACKAGE / "core" / "adapters.py") if "feddpa" in n
    ]
    assert feddpa_imports == []


# --- the run directory has one blueprint: core/storage.py -----------------------------------------

RUN_DIR_NAMES = {
    "checkpoints",
    "LATEST",
    "state.json",
    "metrics.json",
    "metrics.jsonl",
    "bank.safetensors",
    "adapter_model.safetensors",
    "config.yaml",
    "execution.json",
    "train.log",
    "deepspeed_config.json",
    ".lock",
}
RUN_DIR_PARTS = {"local", "global", "checkpoints", "data", "results", "results-eval"}


def run_dir_literals(path: Path) -> list[str]:
    """Where `path` spells a run-directory name: a string literal naming one of its files, or a
    `something / "local"`-style join onto one of its sub-directories."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and node.value in RUN_DIR_NAMES:
            found.append(f"{path.name}:{node.lineno} {node.value!r}")
        elif (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Div)
            and isinstance(node.right, ast.Constant)
            and node.right.value in RUN_DIR_PARTS
        ):
            found.append(f"{path.name}:{node.lineno} / {node.right.value!r}")
    return found


def test_no_module_but_storage_spells_a_run_directory_path():
    storage = PACKAGE / "core" / "storage.py"
    outside = [f for f in sources() if f != storage]
    assert [hit for f in outside for hit in run_dir_literals(f)] == []
    assert run_dir_literals(storage), "the scanner finds nothing even in storage.py"


def test_run_dir_scanner_sees_literals_and_joins(tmp_path):
    fake = tmp_path / "engine.py"
    fake.write_text(
        'a = run / "checkpoints" / "LATEST"\nb = cdir / "local"\nc = {"local": 1}\nd = "LATESTX"\n'
    )
    assert sorted(run_dir_literals(fake)) == [
        "engine.py:1 'LATEST'",
        "engine.py:1 'checkpoints'",
        "engine.py:1 / 'checkpoints'",
        "engine.py:2 / 'local'",
    ]


# --- methods are strategies: only core/algorithms.py compares method names -----------------------

METHOD_NAMES = {"fedit", "feddpa_t", "feddpa_f", "local", "centralized"}


def method_comparisons(path: Path) -> list[str]:
    """`cfg.method == "feddpa_f"`, `method in ("fedit", ...)` and the like: a method decided by
    its name (a comparison of something called `method` with a method name)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        names: set[object] = set()
        for side in sides:
            if isinstance(side, ast.Tuple | ast.List | ast.Set):
                names.update(e.value for e in side.elts if isinstance(e, ast.Constant))
            elif isinstance(side, ast.Constant):
                names.add(side.value)
        if names & METHOD_NAMES and any("method" in ast.unparse(side) for side in sides):
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_method_name_is_compared_outside_the_strategies():
    strategies = PACKAGE / "core" / "algorithms.py"
    outside = [f for f in sources() if f != strategies]
    assert [hit for f in outside for hit in method_comparisons(f)] == []


def test_method_comparison_scanner(tmp_path):
    fake = tmp_path / "loop.py"
    fake.write_text(
        'a = cfg.method == "feddpa_f"\nb = method in ("fedit", "x")\nc = address == "local"\n'
        'd = cfg.method == "other"\n'
    )
    assert method_comparisons(fake) == ["loop.py:1", "loop.py:2"]
