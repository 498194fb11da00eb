"""House rules that keep the code base livable (the style guide, ../shared/STYLE.md, and
docs/architecture.md): checked, not just written down."""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from dataclasses import dataclass
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


# ---------------------------------------------------------------------- data flows one way

STAGE_ORDER = ("common", "dataset", "fingerprint", "planning", "splits", "preprocess", "nets", "data", "train",
               "infer", "evaluate", "track", "pipeline", "schedule", "report", "demo", "cli")
"""The stages, lowest first (docs/architecture.md): a module imports only from its own stage or lower ones.
A stage is the first part of the module path under autoseg (``autoseg/train/loop.py`` -> train,
``autoseg/splits.py`` -> splits); ``autoseg/__init__.py`` counts as common and ``__main__`` as cli."""

PENDING_ELSEWHERE: set[str] = set()
"""TEMPORARY: violations that other helpers' branches remove; the lead empties this after merging them.
Each entry is a line of the reports below, so a fixed one that is still listed fails the test."""

FUNCTION_LEVEL_ALLOWED: dict[str, str] = {}
"""``module -> imported autoseg module`` pairs allowed inside a function, each with its reason. A
function-level import may only defer a heavy optional dependency (onnx, mlflow, nnunetv2, ...),
never dodge a cycle; none of autoseg's own modules is such a dependency today, hence empty."""


@dataclass(frozen=True)
class Import:
    """One ``import autoseg...`` / ``from autoseg... import`` statement (relative ones resolved)."""

    importer: str
    imported: str
    line: int
    in_function: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stage(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "common"
    return "cli" if parts[1] == "__main__" else parts[1]


def _imported_modules(node: ast.AST, importer: str, is_package: bool, modules: set[str]) -> list[str]:
    """The autoseg modules a statement imports: ``from autoseg.x import y`` imports ``autoseg.x.y`` when
    that is a module, else ``autoseg.x``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "autoseg"]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    if base.split(".")[0] != "autoseg":
        return []
    return sorted({f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names})


def _walk(node: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node under ``node``, with whether it sits inside a function (or lambda)."""
    for child in ast.iter_child_nodes(node):
        yield child, in_function
        yield from _walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                    ast.Lambda)))


@functools.lru_cache(maxsize=1)
def _imports() -> tuple[Import, ...]:
    """Every autoseg import in autoseg/: module level, inside ``if TYPE_CHECKING:``, inside functions."""
    modules = {_module_name(p) for p in _modules()}
    found = []
    for path in _modules():
        importer = _module_name(path)
        for node, in_function in _walk(ast.parse(path.read_text(encoding="utf-8"))):
            for imported in _imported_modules(node, importer, path.name == "__init__.py", modules):
                if imported in modules and imported != importer:
                    found.append(Import(importer, imported, getattr(node, "lineno", 0), in_function))
    return tuple(found)


def _pending(problems: list[str]) -> tuple[list[str], list[str]]:
    """(the problems not known to be pending elsewhere, the pending entries that no longer occur)."""
    new = sorted(p for p in problems if p not in PENDING_ELSEWHERE)
    return new, sorted(PENDING_ELSEWHERE - set(problems))


def test_the_stage_order_names_every_stage() -> None:
    stages = {_stage(_module_name(p)) for p in _modules()}
    assert stages - set(STAGE_ORDER) == set()


def test_no_import_goes_up_the_stage_order() -> None:
    rank = {s: i for i, s in enumerate(STAGE_ORDER)}
    upward = sorted({f"{i.importer}:{i.line} ({_stage(i.importer)}) imports {i.imported} ({_stage(i.imported)})"
                     for i in _imports() if rank[_stage(i.imported)] > rank[_stage(i.importer)]})
    assert upward == []


def _find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted; sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def test_find_cycles_reports_each_cycle_once() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"f"}}
    assert _find_cycles(edges) == [["a", "b", "c"], ["d", "e"]]


def test_no_import_cycle_between_stages() -> None:
    edges: dict[str, set[str]] = {}
    for i in _imports():
        if _stage(i.importer) != _stage(i.imported):
            edges.setdefault(_stage(i.importer), set()).add(_stage(i.imported))
    assert _find_cycles(edges) == []


def test_no_import_cycle_between_modules() -> None:
    edges: dict[str, set[str]] = {}
    for i in _imports():
        edges.setdefault(i.importer, set()).add(i.imported)
    cycles = [f"cycle {' <-> '.join(c)}" for c in _find_cycles(edges)]
    new, fixed = _pending(cycles)
    assert new == [], "import cycles (modules that import each other, directly or around a loop)"
    assert [f for f in fixed if f.startswith("cycle")] == [], "fixed: remove these from PENDING_ELSEWHERE"


def test_no_function_level_autoseg_imports() -> None:
    """Imports inside functions hide the dependency graph (and, once, hid cycles); only heavy optional
    third-party dependencies may be deferred, which autoseg's own modules never are."""
    found = sorted({f"function-level {i.importer} -> {i.imported}" for i in _imports()
                    if i.in_function and FUNCTION_LEVEL_ALLOWED.get(i.importer) != i.imported})
    new, fixed = _pending(found)
    assert new == []
    assert [f for f in fixed if f.startswith("function-level")] == [], "fixed: remove these from PENDING_ELSEWHERE"


MAX_MODULE_LINES = 500
"""Past this a module holds more than one responsibility (issue 21; ../shared/STYLE.md says split past ~600)."""


def test_no_module_is_over_the_line_cap() -> None:
    long = sorted(f"{p.relative_to(PACKAGE).as_posix()} ({n} lines)" for p in _modules()
                  if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES)
    assert long == []
