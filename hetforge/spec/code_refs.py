"""Static checks of the code a pipeline names, without running any of it.

A stage names code as `file.py:Name` (relative to the pipeline's folder) or `package.module:Name`.
`validate` must report a missing file, package or name where the user wrote it, but must not run
user code to find out: importing a module executes it (and may take seconds, touch devices or fail
for reasons unrelated to the reference). So files are parsed with `ast`, and packages are found with
`importlib.machinery.PathFinder`, which looks at the file system and executes nothing (not even
parent packages' `__init__`, unlike `importlib.util.find_spec`).

A name counts as defined when the module binds it anywhere at module level, under `if`/`try` too:
`def`, `class`, an assignment or an import. A module that can define names dynamically (a
module-level `__getattr__`, a star import, an assignment to `sys.modules[...]` as lazy-loading
packages such as transformers do, or a compiled extension) gets the benefit of the doubt.
"""

from __future__ import annotations

import ast
import difflib
import functools
import sys
from dataclasses import dataclass
from importlib.machinery import PathFinder, SourceFileLoader
from pathlib import Path

PROBLEM_FILE_NAMES = ("Model", "get_inputs", "get_init_inputs")  # the kernel-benchmark convention


@dataclass(frozen=True)
class ModuleNames:
    """What a module source binds at module level, and whether it may bind more at run time."""

    names: frozenset[str]
    dynamic: bool  # names may come from a star import, __getattr__, sys.modules tricks or compiled code
    where: str  # the file, for messages


def check_reference(target: str, base_dir: Path, kind: str = "a name") -> str | None:
    """Why `target` (`file.py:Name` or `package.module:Name`) cannot resolve, or None when it may.

    `kind` says what the name should be, for the message ("a class", "a function").
    """
    location, _, name = target.partition(":")
    if location.endswith(".py"):
        path = base_dir / location
        if not path.is_file():
            return f"an existing file relative to the pipeline's folder ({base_dir})"
        module = module_names(str(path.resolve()))
    else:
        found = find_module_source(location, base_dir)
        if isinstance(found, str):
            return found
        if found is None:  # a compiled or namespace module: nothing to parse
            return None
        module = module_names(str(found))
    if module is None:
        return f"{kind} in a Python file that parses; {location} has a syntax error"
    if name in module.names or module.dynamic:
        return None
    return f"{kind} that {location} defines; {_no_such_name(name, module)}"


def check_constructor(target: str, base_dir: Path, args: list | None, kwargs: dict) -> str | None:
    """Why the class `target` names cannot be built with `args` and `kwargs`, or None when it may be.

    Read from the `__init__` the class itself defines (parsed, not run); a class that inherits its constructor,
    or a module that cannot be parsed or may bind names at run time, gets the benefit of the doubt.
    """
    location, _, name = target.partition(":")
    if location.endswith(".py"):
        path = (base_dir / location).resolve()
    else:
        found = find_module_source(location, base_dir)
        if not isinstance(found, Path):
            return None
        path = found
    init = _constructor(str(path), name)
    if init is None:
        return None
    params = init.args
    positional = [a.arg for a in (*params.posonlyargs, *params.args)][1:]  # without self
    defaults = len(params.defaults)
    required = positional[: len(positional) - defaults] if defaults else positional
    required += [a.arg for a, d in zip(params.kwonlyargs, params.kw_defaults) if d is None]
    keywords = {a.arg for a in (*params.args, *params.kwonlyargs)} - {a.arg for a in params.posonlyargs}
    args = list(args or ())
    if len(args) > len(positional) and params.vararg is None:
        return f"arguments {name}.__init__ accepts; it takes {len(positional)} positional argument(s), not {len(args)}"
    unknown = sorted(k for k in kwargs if k not in keywords)
    if unknown and params.kwarg is None:
        close = difflib.get_close_matches(unknown[0], sorted(keywords - {"self"}), n=1)
        hint = f'; did you mean "{close[0]}"?' if close else f" (it takes {', '.join(positional) or 'none'})"
        return f"arguments {name}.__init__ accepts; it has no parameter {unknown[0]!r}{hint}"
    given = set(positional[: len(args)]) | set(kwargs)
    missing = [r for r in required if r not in given]
    if missing:
        return f"arguments {name}.__init__ needs; {', '.join(repr(m) for m in missing)} missing"
    return None


@functools.lru_cache(maxsize=256)
def _constructor(path: str, name: str) -> ast.FunctionDef | None:
    """The `__init__` that class `name` defines in its own body at module level of `path` (None if it has none)."""
    module = module_names(path)
    if module is None or module.dynamic:
        return None
    tree = ast.parse(Path(path).read_bytes(), path)
    classes = [n for n in _module_level(tree.body) if isinstance(n, ast.ClassDef) and n.name == name]
    if len(classes) != 1:  # absent, or defined twice (under if/try): which one runs is not known without running
        return None
    found = None
    for node in classes[0].body:
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            found = node
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__init__" for t in node.targets):
            return None
    if found is None or found.decorator_list:
        return None
    return found


def missing_problem_names(path: Path) -> list[str]:
    """The names of the problem-file convention that `path` does not define (empty when it may define all)."""
    module = module_names(str(path.resolve()))
    if module is None or module.dynamic:
        return []
    return [n for n in PROBLEM_FILE_NAMES if n not in module.names]


def find_module_source(dotted: str, base_dir: Path) -> Path | str | None:
    """The source file of module `dotted`, searched in the pipeline's folder then on sys.path.

    A str is why it cannot be found; None means it exists but has no Python source to read.
    """
    parts = dotted.split(".")
    search: list[str] | None = [str(base_dir), *sys.path]
    spec = None
    for depth, part in enumerate(parts):
        spec = PathFinder.find_spec(part, search)
        if spec is None:
            prefix = ".".join(parts[: depth + 1])
            if depth == 0:
                return f"an importable module; no package {part!r} in the pipeline's folder or the Python path"
            return f"an importable module; {prefix} does not exist"
        search = list(spec.submodule_search_locations or []) or None
        if depth < len(parts) - 1 and search is None:
            return f"an importable module; {'.'.join(parts[: depth + 1])} is a module, not a package"
    if spec is None or not isinstance(spec.loader, SourceFileLoader) or not spec.origin:
        return None
    return Path(spec.origin)


@functools.lru_cache(maxsize=256)
def module_names(path: str) -> ModuleNames | None:
    """The module-level names a Python file binds (None when it does not parse)."""
    try:
        tree = ast.parse(Path(path).read_bytes(), path)
    except (SyntaxError, ValueError, OSError):
        return None
    names: set[str] = set()
    dynamic = False
    for node in _module_level(tree.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            dynamic |= node.name == "__getattr__"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    dynamic = True
                else:
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name):
                        names.add(sub.id)
                    elif isinstance(sub, ast.Subscript) and "sys.modules" in ast.unparse(sub.value):
                        dynamic = True  # a lazy module replaces itself in sys.modules
        elif isinstance(node, ast.Expr) and "globals()" in ast.unparse(node):
            dynamic = True  # globals().update(...) and the like
    return ModuleNames(frozenset(names), dynamic, path)


def _module_level(body: list[ast.stmt]):
    """Statements executed at import time: the body, and the branches of its if/try/with blocks."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level(block)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)


def _no_such_name(name: str, module: ModuleNames) -> str:
    public = sorted(n for n in module.names if not n.startswith("_"))
    close = difflib.get_close_matches(name, public, n=1)
    if close:
        return f'it has no {name!r}; did you mean "{close[0]}"?'
    shown = ", ".join(public[:8]) + (", ..." if len(public) > 8 else "")
    return f"it has no {name!r} (it defines {shown or 'no public names'})"


def check_hf_model(model: str, base_dir: Path) -> str | None:
    """Why a HuggingFace stage's `model` cannot be found locally, or None: a folder with config.json relative to
    the pipeline, else a model id whose config is in the local cache (looked up on disk, never downloaded)."""
    folder = base_dir / model
    if folder.is_dir():
        return (
            None
            if (folder / "config.json").is_file()
            else f"a model folder saved with save_pretrained; {folder} has no config.json"
        )
    try:
        from huggingface_hub import try_to_load_from_cache  # optional: installed with transformers
    except ImportError:
        return f"a model folder relative to the pipeline's folder ({base_dir}); huggingface_hub is not installed to look up model ids"
    try:
        cached = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a valid repo id either
        cached = None
    if isinstance(cached, str):
        return None
    return (
        f"a model folder relative to the pipeline's folder ({base_dir}) or a model id in the local HuggingFace cache; "
        "neither exists and nothing is downloaded"
    )
