"""The layout holds: the library never imports the application, modules stay small, imports sit at the
top of each module."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "livr_model"
APP = PACKAGE / "app"
MAX_LINES = 400
# Modules allowed over MAX_LINES, with the reason. patch.py: another change is rewriting its
# per-forward path; it is split after that lands rather than moved under it.
LONG_MODULES: dict = {}
# (module, imported name) pairs allowed inside a function: optional heavy dependencies.
LOCAL_IMPORTS = {("app/data/blink.py", "datasets"), ("app/data/benchmarks.py", "pyarrow.parquet")}
TRAINING_STACK = ("peft", "livr_model.app")
# Library modules that may load the training stack (never the application), with the reason.
# integrations: transformers' Trainer callback API imports accelerate and peft; livr_model loads
# it only when LivrCollator or LivrStageCallback is asked for.
TRAINER_BRIDGES = {"integrations"}


def _modules(root: Path):
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _library_modules():
    return [p for p in _modules(PACKAGE) if APP not in p.parents]


def test_importing_the_library_loads_no_application_or_training_stack():
    names = ["livr_model"] + [f"livr_model.{p.stem}" for p in _library_modules() if p.stem not in ("__init__", *TRAINER_BRIDGES)]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({TRAINING_STACK!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"the library pulled in {out.stdout.strip()}"
    assert len(names) >= 7, names


def test_trainer_bridge_loads_neither_the_application_nor_trl():
    code = (
        "import sys\n"
        "from livr_model import LivrCollator, LivrStageCallback\n"
        "print(sorted(m for m in sys.modules if m.startswith(('livr_model.app', 'trl'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"the trainer integrations pulled in {out.stdout.strip()}"


@pytest.mark.parametrize("path", _library_modules(), ids=lambda p: p.name)
def test_library_sources_name_no_application_module(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = ("." * node.level) + (node.module or "")
            assert not (target.startswith("livr_model.app") or target in (".app",) or target.startswith(".app.")), \
                f"{path.name}:{node.lineno} imports {target}"
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("livr_model.app") for a in node.names), f"{path.name}:{node.lineno}"


@pytest.mark.parametrize("path", _modules(PACKAGE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_short(path):
    lines = len(path.read_text().splitlines())
    limit = LONG_MODULES.get(str(path.relative_to(PACKAGE)), MAX_LINES)
    assert lines <= limit, f"{path.relative_to(PACKAGE)} has {lines} lines (limit {limit})"


@pytest.mark.parametrize("path", _modules(PACKAGE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_sit_at_module_top(path):
    rel = str(path.relative_to(PACKAGE))
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            names = {(node.module or "") if isinstance(node, ast.ImportFrom) else a.name for a in node.names}
            assert all((rel, n) in LOCAL_IMPORTS for n in names), f"{rel}:{node.lineno} imports {names} inside a function"


def test_long_module_exceptions_are_still_needed():
    for rel, limit in LONG_MODULES.items():
        lines = len((PACKAGE / rel).read_text().splitlines())
        assert MAX_LINES < lines <= limit, f"{rel}: {lines} lines; drop or tighten its exception"
