"""`python -m tools.check_structure`: the layering rules of docs/design.md, checked on the source.

Every module of the project's packages is parsed (ast, no import) and its imports are resolved,
function-level ones included. Rules:

1. no import cycle among the project's modules through module-level imports (the ones that run when
   the module is imported; ``if TYPE_CHECKING:`` blocks and function bodies excluded);
2. layers: ``common/`` imports no project package; ``models/`` imports only ``common/``;
   ``data_pipeline/`` imports only ``common/``; ``trainer/`` may import all three;
3. ``deepspeed``, ``torch.distributed.fsdp`` and the ``accelerate`` package are imported only under
   ``trainer/engines/`` (today no module imports ``accelerate`` at all: launch detection reads the
   ACCELERATE_* environment variables in trainer/engines/base.py, and ``accelerate launch`` is a
   launcher command, not a library the code calls).

Exit status 1 and one line per violation when a rule is broken.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("common", "data_pipeline", "models", "trainer")
# package -> project packages it may import (besides itself)
ALLOWED = {"common": set(), "models": {"common"}, "data_pipeline": {"common"},
           "trainer": {"common", "data_pipeline", "models"}}
ENGINE_ONLY = ("deepspeed", "torch.distributed.fsdp", "accelerate")
ENGINES = "trainer.engines"


@dataclass(frozen=True)
class Import:
    target: str          # dotted module name as written (resolved if relative)
    line: int
    module_level: bool   # runs when the importing module is imported
    stated: bool = True  # False for ``b`` of ``from a import b``: a.b, which may not be a module


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file for every .py file of the project's packages."""
    return {module_name(root, p): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[tuple[str, bool]]:
    """(module, stated) an import statement names: ``from a import b`` gives (a, True), (a.b, False)."""
    if isinstance(node, ast.Import):
        return [(alias.name, True) for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: strip level packages from this module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [(base, True)] + [(f"{base}.{alias.name}", False) for alias in node.names]


def imports_of(path: Path, module: str) -> list[Import]:
    """Every import in the file, marked module-level or not."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend(Import(t, child.lineno, module_level, stated)
                             for t, stated in _targets(child, module, is_package))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                visit(child, False)
            else:
                visit(child, module_level)

    visit(tree, True)
    return found


def resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The project module an import target names (``from pkg import name`` names pkg.name only when
    that is a module), or None for third-party / standard-library modules."""
    return target if target in modules else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (a list of modules, first == last) of the directed graph, or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := dfs(start)):
            return cycle
    return None


def _layer_violation(module: str, imp: Import) -> str | None:
    own, other = module.split(".")[0], imp.target.split(".")[0]
    if other in PACKAGES and other != own and other not in ALLOWED[own]:
        return f"{own}/ must not import {other}/ (layers, docs/design.md)"
    in_engines = module == ENGINES or module.startswith(ENGINES + ".")
    for name in ENGINE_ONLY:
        if (imp.target == name or imp.target.startswith(name + ".")) and not in_engines:
            return f"{name} may be imported only under trainer/engines/"
    return None


def check(root: Path) -> list[str]:
    """All violations of the rules above in the tree at ``root`` (empty when it is clean)."""
    modules = project_modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    problems: list[str] = []
    for module, path in modules.items():
        for imp in imports_of(path, module):
            where = f"{path.relative_to(root)}:{imp.line}"
            if imp.stated and (why := _layer_violation(module, imp)) is not None:
                problems.append(f"{where}: imports {imp.target}: {why}")
            target = resolve(imp.target, modules)
            if imp.module_level and target is not None and target != module:
                graph[module].add(target)
    if (cycle := find_cycle(graph)) is not None:
        problems.append("import cycle (module-level imports): " + " -> ".join(cycle))
    return sorted(set(problems))


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    problems = check(root)
    for line in problems:
        print(line)
    print(f"check_structure: {len(project_modules(root))} modules, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
