"""What the package's structure is, counted from its source (``python tests/architecture.py``).

- private reaches: ``obj._name`` on an object that is not ``self``/``cls``, where ``_name`` is
  not defined in the package (subpackage, or top-level module) doing the access, and
  ``from X import _name`` across packages;
- the import graph of ``regcollect``'s modules (module-level imports) and its cycles;
- ``sys.modules`` writes and ``gc.get_objects`` calls;
- functions longer than ``MAX_FUNCTION`` lines, modules longer than ``MAX_MODULE``.

``tests/test_architecture.py`` asserts on these numbers; ``--graph`` prints the package-level
import graph that ``docs/concepts.md`` shows.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "regcollect"
MAX_FUNCTION, MAX_MODULE = 60, 420  # lines of code; a module of about 400


def modules() -> dict[str, Path]:
    """``{"regcollect._engine.plan": path}`` for every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def package_of(module: str) -> str:
    """The unit that may share private names: a subpackage (``regcollect._engine``), or a
    top-level module on its own."""
    parts = module.split(".")
    if len(parts) >= 3:
        return ".".join(parts[:2])
    return module


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    if node.level == 0:
        return node.module if node.module and node.module.startswith("regcollect") else None
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _defined_names(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, attributes set on self/cls or at
    class level, module globals."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Constant,)) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries, setattr names
    return {n for n in names if n.startswith("_")}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def scan() -> dict[str, object]:
    found = modules()
    trees = {name: ast.parse(path.read_text()) for name, path in found.items()}
    defined: dict[str, set[str]] = defaultdict(set)
    for name, tree in trees.items():
        defined[package_of(name)] |= _defined_names(tree)
    reaches: list[str] = []
    graph: dict[str, set[str]] = defaultdict(set)
    sys_modules, gc_scans, long_functions, long_modules = [], [], [], []
    for name, tree in trees.items():
        path = found[name]
        is_package = path.name == "__init__.py"
        own = defined[package_of(name)]
        for node in tree.body:
            for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
                if isinstance(sub, ast.ImportFrom):
                    target = _resolve(name, is_package, sub)
                    if target is None:
                        continue
                    for alias in sub.names:
                        full = f"{target}.{alias.name}"
                        graph[name].add(full if full in found else target)
                elif isinstance(sub, ast.Import):
                    for alias in sub.names:
                        if alias.name.startswith("regcollect"):
                            graph[name].add(alias.name)
        for node in ast.walk(tree):
            line = f"{path.relative_to(ROOT.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and _private(node.attr):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                if node.attr not in own and not _torch_or_python(node):
                    reaches.append(f"{line} .{node.attr}")
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, is_package, node)
                if target is not None and package_of(target) != package_of(name):
                    for alias in node.names:
                        # A private module (_naming) is the package's own; a private name
                        # from another package's module is a reach.
                        if _private(alias.name) and f"{target}.{alias.name}" not in found:
                            reaches.append(f"{line} import {alias.name}")
            if isinstance(node, ast.Attribute) and node.attr == "modules":
                if isinstance(node.value, ast.Name) and node.value.id in ("sys", "_sys"):
                    parent_write = _written(tree, node)
                    if parent_write:
                        sys_modules.append(line)
            if isinstance(node, ast.Attribute) and node.attr == "get_objects":
                gc_scans.append(line)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = _code_lines(node)
                if length > MAX_FUNCTION:
                    long_functions.append(f"{line} {node.name} ({length} lines)")
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE:
            long_modules.append(f"{path.relative_to(ROOT.parent)} ({lines} lines)")
    graph = {k: {t for t in v if t in found and t != k} for k, v in graph.items()}
    packages = package_graph(graph)
    return {
        "private_reaches": reaches,
        "cycles": _cycles(graph, found),
        "package_cycles": _cycles(packages, {p: Path() for p in _nodes(packages)}),
        "sys_modules_writes": sys_modules,
        "gc_scans": gc_scans,
        "long_functions": long_functions,
        "long_modules": long_modules,
        "graph": graph,
    }


# Attributes whose private name is torch's or Python's own (torch._C, module._parameters,
# tensor._version, frame attributes): not the package's encapsulation.
_TORCH_OR_PYTHON = {
    "_C",
    "_parameters",
    "_buffers",
    "_modules",
    "_version",
    "_dynamo",
    "_foreach_add_",
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
    "_optimizer_step_pre_hooks",
    "_execution_engine",
    # FSDP1's FlatParameter and its handle (regcollect._distributed.fsdp1, .held).
    "_shapes",
    "_shard_param_infos",
    "_sharded_size",
    "_shard_numel_padded",
    "_getframe",
    "_call_impl",
    "_subclasses",
    "_symbolic_trace",
    "_guards",
    "_utils",
    "_functorch",
    "_tensor",
}


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's lines from its signature to its end, its docstring left out."""
    body = node.body
    doc = (
        body[0]
        if body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
        else None
    )
    total = (node.end_lineno or node.lineno) - node.lineno + 1
    if doc is not None:
        total -= (doc.end_lineno or doc.lineno) - doc.lineno + 1
    return total


def _torch_or_python(node: ast.Attribute) -> bool:
    if node.attr in _TORCH_OR_PYTHON or node.attr.startswith("_foreach"):
        return True
    root = node.value
    while isinstance(root, ast.Attribute):
        root = root.value
    return isinstance(root, ast.Name) and root.id in ("torch", "dist", "sys", "_sys", "types")


def _written(tree: ast.AST, target: ast.Attribute) -> bool:
    """Whether ``sys.modules`` is assigned into or updated there."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Subscript) and t.value is target:
                    return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            inner = node.func.value
            if node.func.attr in ("update", "setdefault", "__setitem__"):
                if inner is target or (isinstance(inner, ast.Subscript) and inner.value is target):
                    return True
                if isinstance(inner, ast.Attribute) and inner.attr == "__dict__":
                    sub = inner.value
                    if isinstance(sub, ast.Subscript) and sub.value is target:
                        return True
    return False


def _cycles(graph: dict[str, set[str]], found: dict[str, Path]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(found):
        if v not in index:
            visit(v)
    return out


def _nodes(graph: dict[str, set[str]]) -> set[str]:
    return set(graph) | {t for targets in graph.values() for t in targets}


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between packages (subpackages and top-level modules)."""
    out: dict[str, set[str]] = defaultdict(set)
    for source, targets in graph.items():
        for target in targets:
            a, b = package_of(source), package_of(target)
            if a != b and a != "regcollect" and b != "regcollect":
                out[a].add(b)
    return out


def picture(graph: dict[str, set[str]]) -> str:
    """The package graph as ``docs/architecture.md`` shows it: packages bottom-up (each line
    imports only lines above it), with what each imports."""
    packages = package_graph(graph)
    order: list[str] = []
    nodes = sorted(_nodes(packages))
    while len(order) < len(nodes):
        ready = [n for n in nodes if n not in order and packages.get(n, set()) <= set(order)]
        if not ready:  # a cycle: the test fails on it; show the rest as they come
            ready = [n for n in nodes if n not in order]
        order.extend(sorted(ready))
    short = lambda name: name.replace("regcollect.", "")  # noqa: E731
    lines = []
    for name in order:
        uses = ", ".join(short(t) for t in sorted(packages.get(name, ())))
        if not uses:
            lines.append(short(name))
            continue
        # wrapped at 88 characters, the docs' code width (tests/test_docs.py), continuation
        # lines under the first import
        indent = " " * len(f"{'':<16} <- ")
        lines.append(
            textwrap.fill(
                uses, 88, initial_indent=f"{short(name):<16} <- ", subsequent_indent=indent
            )
        )
    return "\n".join(lines)


def main() -> None:
    result = scan()
    if "--graph" in sys.argv:
        print(picture(result["graph"]))  # type: ignore[arg-type]
        return
    for key, value in result.items():
        if key == "graph":
            continue
        print(f"{key}: {len(value)}")  # type: ignore[arg-type]
        for item in value[:400]:  # type: ignore[index]
            print(f"  {item}")


if __name__ == "__main__":
    main()
