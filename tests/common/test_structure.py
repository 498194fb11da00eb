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


def _text_call_without_encoding(node: ast.AST) -> bool:
    """open()/Path.open("w")/read_text()/write_text() in text mode that names no encoding."""
    if not isinstance(node, ast.Call) or any(k.arg in ("encoding", None) for k in node.keywords):
        return False
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr in ("read_text", "write_text"):
        return True
    is_builtin = isinstance(func, ast.Name) and func.id == "open"
    is_method = isinstance(func, ast.Attribute) and func.attr == "open" and not (
        isinstance(func.value, ast.Name) and func.value.id == "os")
    if not (is_builtin or is_method):
        return False
    mode = next((k.value for k in node.keywords if k.arg == "mode"), None)
    position = 1 if is_builtin else 0
    if mode is None and len(node.args) > position:
        mode = node.args[position]
    if mode is None:
        return is_builtin  # open(path) reads text; zf.open(name), Store.open(paths) are not files
    text = mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else None
    return text is not None and "b" not in text and (is_builtin or set(text) <= set("rwxa+t"))


def test_every_text_file_read_and_write_names_its_encoding() -> None:
    """Python's default is the locale's encoding, ASCII in some environments (issue 24)."""
    offenders = [f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno}" for path in _modules()
                 for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if _text_call_without_encoding(node)]
    assert offenders == [], "name encoding=\"utf-8\" (python3 /work/encoding_sweep.py does it)"
