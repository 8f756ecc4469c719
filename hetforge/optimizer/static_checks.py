"""Static review flags on candidate source: patterns known from reward hacking.

These never reject by themselves (legitimate code can match them); they mark a candidate
`needs_review`, so that a human looks before it is promoted.
"""

from __future__ import annotations

import ast

from hetforge.optimizer.verdict import STATIC_FLAG_PREFIX

# Modules whose use in a kernel candidate suggests tampering, escaping the timer, or doing work elsewhere.
_SUSPICIOUS_MODULES = {
    "threading": "runs work on threads the timer does not see",
    "multiprocessing": "runs work in other processes",
    "subprocess": "starts programs",
    "ctypes": "calls native code directly",
    "signal": "interferes with signals",
    "gc": "inspects live objects (can find the judge's tensors)",
    "inspect": "inspects callers' frames",
    "socket": "opens network connections",
    "pickle": "deserializes arbitrary objects",
    "builtins": "patches builtins",
    "importlib": "imports code dynamically",
}
# Call (matched on its last one or two names) -> (flag key, why).
_SUSPICIOUS_CALLS = {
    "cuda.Stream": ("side_stream", "creates a side stream (work there can hide from events)"),
    "cuda.stream": ("side_stream", "switches streams (work there can hide from events)"),
    "sys._getframe": ("frame_inspection", "inspects callers' frames"),
    "os.fork": ("fork", "forks"),
    "os.system": ("shell", "runs shell commands"),
    "lru_cache": ("result_cache", "caches results across calls"),
    "functools.cache": ("result_cache", "caches results across calls"),
    "torch.set_default_dtype": ("precision_switch", "changes global precision"),
}
_REFERENCE_NAMES = {"Model", "get_inputs", "get_init_inputs"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def review_flags(source: str) -> list[str]:
    """Flags (`static:<what>: <why>`) for patterns in `source`; a syntax error is left to the loader."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    flags: dict[str, str] = {}  # rule -> why, one per rule: the first reason found

    def add(rule: str, why: str) -> None:
        flags.setdefault(rule, why)

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                root = name.split(".")[0]
                if root in _SUSPICIOUS_MODULES:
                    add(f"import_{root}", _SUSPICIOUS_MODULES[root])
            if isinstance(node, ast.ImportFrom) and any(a.name in _REFERENCE_NAMES for a in node.names):
                add("calls_reference", "imports the reference's Model or inputs")
        elif isinstance(node, ast.Try):
            # A handler that computes something is a fallback path: the fast path may never be the one timed.
            for handler in node.handlers:
                if any(isinstance(n, ast.Call) for n in ast.walk(handler)) and not all(
                    isinstance(s, ast.Raise) for s in handler.body
                ):
                    add("try_except_fallback", "an exception handler computes a fallback result")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            for pattern, (key, why) in _SUSPICIOUS_CALLS.items():
                if name == pattern or name.endswith("." + pattern):
                    add(key, why)
            if name in ("Model", "get_inputs") or name.endswith(".Model"):
                add("calls_reference", "calls the reference model")
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                name = _dotted(target)
                if (
                    name.endswith("allow_tf32")
                    or name.endswith("allow_bf16_reduced_precision_reduction")
                    or name.endswith("allow_fp16_reduced_precision_reduction")
                ):
                    add("precision_switch", "changes global matmul precision")
                if name.startswith(("torch.", "time.", "os.", "sys.")) and "backends" not in name:
                    add("patches_library", f"assigns to {name}")
    return [f"{STATIC_FLAG_PREFIX}{rule}: {why}" for rule, why in flags.items()]
