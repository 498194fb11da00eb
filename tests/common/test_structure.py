"""House rules that keep the code base livable (STYLE.md): checked, not just written down."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "autoseg"

ENV_ALLOWED = {"common/paths.py", "schedule/executors.py"}
"""Only these modules (and the CLI, which hands os.environ to them) may read the environment."""


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_environment_is_read_only_in_paths_executors_and_cli() -> None:
    offenders = []
    for path in _modules():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ENV_ALLOWED or rel.startswith("cli/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "os" and node.attr in ("environ", "getenv", "putenv")):
                offenders.append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                    a.name in ("environ", "getenv") for a in node.names):
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []


def test_no_library_module_imports_the_cli() -> None:
    offenders = []
    for path in _modules():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("cli/") or rel == "__main__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("autoseg.cli"):
                offenders.append(rel)
            if isinstance(node, ast.Import) and any(a.name.startswith("autoseg.cli") for a in node.names):
                offenders.append(rel)
    assert offenders == []


def test_checkpoints_are_never_unpickled() -> None:
    offenders = []
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        if "weights_only=False" in text or "pickle.load" in text:
            offenders.append(path.relative_to(PACKAGE).as_posix())
    assert offenders == []
