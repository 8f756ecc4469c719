"""Located errors of pipeline files: `FILE:LINE:COL: Got "<value>" for <field>: <rule>.`"""

from __future__ import annotations

from dataclasses import dataclass

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """Something wrong at a place in the document, before it is given a line and column."""

    path: Path  # keys and list indices from the document root
    value: object  # what the user wrote there (None when nothing was written)
    must: str  # what it must be, as a sentence fragment
    at_key: bool = False  # point at the key rather than its value (unknown fields)


@dataclass(frozen=True)
class Diagnostic:
    """One located error, ready to print."""

    file: str
    line: int  # 1-based
    col: int  # 1-based
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class SpecError(Exception):
    """A pipeline file is not valid; carries every located error found in it."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = sorted(diagnostics, key=lambda d: (d.file, d.line, d.col))
        super().__init__("\n".join(str(d) for d in self.diagnostics))


def field_name(path: Path) -> str:
    """`stages[2].batching.max_batch_size` from ('stages', 2, 'batching', 'max_batch_size')."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "the document"


def show_value(value: object, limit: int = 60) -> str:
    """A short printable form of a user's value, for messages."""
    if value is None:
        text = "nothing"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = "a mapping"
    elif isinstance(value, list):
        text = "a list"
    else:
        text = str(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def message(problem: Problem) -> str:
    must = problem.must.rstrip(".")
    end = "" if must.endswith("?") else "."
    return f'Got "{show_value(problem.value)}" for {field_name(problem.path)}: {must}{end}'
