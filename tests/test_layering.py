"""The package layering, checked on the source: a rule broken anywhere fails here.

Bottom to top: core and state (with config) < kernels < optimizer; core < spec; planners over spec and
optimizer; serving over all of them; cli and demo on top. `core`, `state`, `kernels` and `optimizer`
import only torch, triton, numpy and the standard library at module level: they run on a bare GPU host
that has no pydantic, ray or fastapi. Inside a hetforge package an import of hetforge itself sits at
module level (an import inside a function would hide a cycle); only the CLI and the demo import
hetforge modules lazily, so that `hetforge --help` starts without ray or torch.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1] / "hetforge"

# Which hetforge packages each package may import (itself included).
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "core": {"config"},
    "state": {"config"},  # the SQL store under the registry and the boards; psycopg imported lazily
    "kernels": {"state", "core", "config"},
    "optimizer": {"kernels", "state", "core", "config"},
    "spec": {"core", "config"},
    "planners": {"spec", "optimizer", "kernels", "state", "core", "config"},
    "serving": {"planners", "spec", "optimizer", "kernels", "state", "core", "config"},
    "cli": {"demo", "serving", "planners", "spec", "optimizer", "kernels", "state", "core", "config"},
    "demo": {"serving", "planners", "spec", "optimizer", "kernels", "state", "core", "config"},
}
BARE_HOST = {"core", "state", "kernels", "optimizer", "config"}  # runs where only these third-party packages exist
BARE_HOST_PACKAGES = {"torch", "triton", "numpy"}
LAZY_OK = {"cli", "demo"}  # may import hetforge modules inside functions (start-up time)


MODULES = {
    ".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__") for p in ROOT.rglob("*.py")
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted (absolute)
    line: int
    top_level: bool  # at module level (also inside try/if at module level)
    optional: bool = False  # inside `try: ... except ImportError` (a dependency that may be missing)


def package_of(module: str) -> str:
    """`hetforge.optimizer.judge` -> "optimizer"; `hetforge.cli` -> "cli"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, tree: ast.AST | None = None) -> list[Import]:
    module = module_name(path)
    tree = tree or ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out: list[Import] = []

    def visit(node: ast.AST, top: bool, optional: bool = False) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            guarded = optional or (isinstance(child, ast.Try) and any(_catches_import_error(h) for h in child.handlers))
            if isinstance(child, ast.Import):
                out.extend(Import(module, a.name, child.lineno, top, optional) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for a in child.names:  # `from pkg import submodule` imports the submodule
                    target = f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                    out.append(Import(module, target, child.lineno, top, optional))
            visit(child, inner, guarded)

    visit(tree, True)
    return out


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = {n.id for n in ast.walk(handler.type) if isinstance(n, ast.Name)} if handler.type else set()
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def all_imports() -> list[Import]:
    return [i for path in sorted(ROOT.rglob("*.py")) for i in imports_of(path)]


def is_type_checking_only(path: Path) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:` (never executed)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    lines.add(sub.lineno)
    return lines


def violations(imports: list[Import]) -> list[str]:
    """Every broken rule, as `module:line: why`."""
    out = []
    for i in imports:
        src = package_of(i.module)
        if i.target.startswith("hetforge."):
            dst = package_of(i.target)
            if src and dst != src and dst not in ALLOWED.get(src, set()):
                out.append(f"{i.module}:{i.line}: {src} may not import {dst} ({i.target})")
            if src and not i.top_level and src not in LAZY_OK:
                out.append(
                    f"{i.module}:{i.line}: {i.target} imported inside a function (import hetforge modules at module level)"
                )
        elif src and src not in LAZY_OK and not i.top_level and not i.optional and _always_there(i.target):
            # A lazy import is for an optional heavy dependency; the standard library and torch are always there.
            out.append(f"{i.module}:{i.line}: {i.target} imported inside a function (import it at module level)")
        if not i.target.startswith("hetforge.") and src in BARE_HOST and i.top_level:
            top = i.target.split(".")[0]
            if (
                top
                and top != "hetforge"
                and top not in sys.stdlib_module_names
                and top not in BARE_HOST_PACKAGES
                and top != "__future__"
            ):
                out.append(f"{i.module}:{i.line}: {src} runs on the bare GPU host: no module-level import of {top}")
    return out


def _always_there(target: str) -> bool:
    top = target.split(".")[0]
    return top in sys.stdlib_module_names or top in {"torch", "numpy"}


def test_the_layering_holds_on_main():
    imports = []
    for path in sorted(ROOT.rglob("*.py")):
        skip = is_type_checking_only(path)
        imports += [i for i in imports_of(path) if i.line not in skip]
    assert violations(imports) == []


def test_hetforge_modules_import_no_cycle_at_module_level():
    graph = nx.DiGraph()
    for i in all_imports():
        # An edge to one's own package's __init__ is how a package re-exports its submodules, not a cycle of meaning.
        if i.top_level and i.target in MODULES and not (i.module + ".").startswith(i.target + "."):
            graph.add_edge(i.module, i.target)
    assert list(nx.simple_cycles(graph)) == []


@pytest.mark.parametrize(
    "source, module, why",
    [
        (
            "from hetforge.serving.metrics import Metrics\n",
            "hetforge/kernels/registry.py",
            "kernels may not import serving",
        ),
        (
            "from hetforge.planners import devices\n",
            "hetforge/optimizer/llm_agent.py",
            "optimizer may not import planners",
        ),
        ("from hetforge.planners.plan import build_plan\n", "hetforge/spec/load.py", "spec may not import planners"),
        ("import ray\n", "hetforge/optimizer/judge.py", "no module-level import of ray"),
        ("import pydantic\n", "hetforge/core/problem.py", "no module-level import of pydantic"),
        ("import psycopg\n", "hetforge/state/postgres.py", "no module-level import of psycopg"),
        ("from hetforge.kernels.registry import Registry\n", "hetforge/state/store.py", "state may not import kernels"),
        ("def f():\n    from hetforge.spec import graph\n", "hetforge/planners/plan.py", "imported inside a function"),
        ("def f():\n    import signal\n", "hetforge/optimizer/confine.py", "import it at module level"),
        (
            "def f():\n    import torch.nn.functional as F\n",
            "hetforge/kernels/triton/norm.py",
            "import it at module level",
        ),
    ],
)
def test_a_broken_rule_is_reported(source, module, why):
    path = ROOT.parent / module
    found = violations(imports_of(path, ast.parse(source)))
    assert len(found) == 1 and why in found[0], found


def test_allowed_imports_are_not_reported():
    ok = [
        ("from hetforge.core.problem import Problem\n", "hetforge/serving/deployments.py"),
        ("import torch\nimport numpy as np\nimport json\n", "hetforge/optimizer/judge.py"),
        ("def f():\n    import openai\n", "hetforge/optimizer/llm_agent.py"),
        ("def f():\n    import psycopg\n", "hetforge/state/postgres.py"),
        ("def f():\n    from hetforge.serving import deploy\n", "hetforge/cli/__init__.py"),
    ]
    for source, module in ok:
        assert violations(imports_of(ROOT.parent / module, ast.parse(source))) == []
