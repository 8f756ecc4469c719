"""Safe YAML reading that remembers where every value came from.

PyYAML's composer gives nodes with marks; we build plain Python values from those nodes ourselves
instead of letting a constructor do it, so that
  - no tag can build a Python object (only the YAML core schema's tags are accepted),
  - duplicate keys are errors (PyYAML silently keeps the last one),
  - aliases cannot expand into a bomb (every expanded node counts against a budget),
  - every value keeps its line and column for error messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml
from yaml.constructor import SafeConstructor

from hetforge import config
from hetforge.spec.errors import Diagnostic, Path, field_name

_CORE = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_CORE + t for t in ("str", "int", "float", "bool", "null")}
_TIMESTAMP = _CORE + "timestamp"  # kept as its text: a pipeline has no use for datetime objects
_MAP, _SEQ = _CORE + "map", _CORE + "seq"

# Stands in for a value whose tag was rejected: present, so that checks of the enclosing mapping
# ("exactly one of callable or http") do not add a second, misleading error; its own error is dropped.
REJECTED = "<rejected tag>"


@dataclass
class SourceMap:
    """Line and column (1-based) of each value, and of each mapping key, by document path."""

    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def locate(self, path: Path, at_key: bool = False) -> tuple[int, int]:
        """The mark of `path`, or of its closest ancestor that has one."""
        marks = self.keys if at_key and path in self.keys else self.values
        for end in range(len(path), -1, -1):
            if path[:end] in marks:
                return marks[path[:end]]
        return (1, 1)


class YamlError(Exception):
    """The text is not a YAML document hetforge can read safely."""

    def __init__(self, line: int, col: int, message: str):
        super().__init__(message)
        self.line, self.col, self.message = line, col, message

    def diagnostic(self, file: str) -> Diagnostic:
        return Diagnostic(file, self.line, self.col, self.message)


def _mark(mark: yaml.Mark | None) -> tuple[int, int]:
    return (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)


def _position(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def decode(data: bytes) -> str:
    """UTF-8 text of a pipeline file; YamlError at the first byte that is not."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line, col = _position(data[: err.start].decode("utf-8", "replace"), err.start)
        raise YamlError(
            line, col, f'Got "byte 0x{data[err.start]:02x}" for the document: UTF-8 text (is this a binary file?).'
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def parse(text: str) -> tuple[object, SourceMap, list[tuple[Path, YamlError]]]:
    """The document's value, its source map and the recoverable errors found while reading it.

    Recoverable errors (a forbidden tag, a duplicate key) are collected so that a file's errors are
    all reported at once; the offending value is left out. Anything that makes the rest of the
    file unreadable or unsafe to expand raises YamlError.
    """
    if not text.strip():
        raise YamlError(1, 1, 'Got "nothing" for the document: a pipeline mapping with name, entry, output and stages.')
    _check_depth(text)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        raise _syntax(err) from None
    except yaml.YAMLError as err:  # ReaderError: a character YAML does not allow
        raise _reader(text, err) from None
    if root is None:
        raise YamlError(1, 1, 'Got "nothing" for the document: a pipeline mapping with name, entry, output and stages.')
    builder = _Builder(config.spec_max_nodes(), config.spec_max_depth())
    value = builder.build(root, ())
    return value, builder.source, builder.errors


def _syntax(err: yaml.MarkedYAMLError) -> YamlError:
    line, col = _mark(err.problem_mark or err.context_mark)
    what = " ".join(p for p in (err.context, err.problem) if p)
    return YamlError(line, col, f'Got "invalid YAML" for the document: {what}.')


def _reader(text: str, err: yaml.YAMLError) -> YamlError:
    position = getattr(err, "position", 0)
    line, col = _position(text, position)
    char = getattr(err, "character", "?")
    point = ord(char) if isinstance(char, str) and len(char) == 1 else char
    code = f"U+{point:04X}" if isinstance(point, int) else str(point)
    return YamlError(line, col, f'Got "{code}" for the document: printable UTF-8 text (is this a binary file?).')


def _check_depth(text: str) -> None:
    """Reject deep nesting from the event stream, before the recursive composer sees it."""
    limit, depth = config.spec_max_depth(), 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > limit:
                    line, col = _mark(event.start_mark)
                    raise YamlError(
                        line, col, f'Got "nesting {depth} levels deep" for the document: at most {limit} levels.'
                    )
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.MarkedYAMLError as err:
        raise _syntax(err) from None
    except yaml.YAMLError as err:
        raise _reader(text, err) from None


class _Builder:
    """Plain values from composed nodes, with the checks described in the module docstring."""

    def __init__(self, max_nodes: int, max_depth: int):
        self.source = SourceMap()
        self.budget = max_nodes
        self.max_nodes = max_nodes
        self.max_depth = max_depth
        self.scalars = SafeConstructor()
        self.errors: list[tuple[Path, YamlError]] = []

    def build(self, node: yaml.Node, path: Path) -> object:
        self.budget -= 1
        if self.budget < 0:  # aliases can make a short file expand exponentially ("billion laughs")
            line, col = _mark(node.start_mark)
            raise YamlError(
                line,
                col,
                f'Got "more than {self.max_nodes} values" for the document: a smaller file (do aliases expand too much?).',
            )
        if len(path) > self.max_depth:  # a recursive alias (&a [*a]) composes into a cycle
            line, col = _mark(node.start_mark)
            raise YamlError(
                line, col, f'Got "nesting deeper than {self.max_depth}" for the document: no recursive aliases.'
            )
        self.source.values.setdefault(path, _mark(node.start_mark))
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path) if self._tag_ok(node, {_MAP}, path) else REJECTED
        if isinstance(node, yaml.SequenceNode):
            if not self._tag_ok(node, {_SEQ}, path):
                return REJECTED
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        if not self._tag_ok(node, _SCALAR_TAGS | {_TIMESTAMP}, path):
            return REJECTED
        if node.tag == _TIMESTAMP:
            return node.value
        return self.scalars.construct_object(node)

    def _tag_ok(self, node: yaml.Node, allowed: set[str], path: Path) -> bool:
        # Tags like !!python/object/apply would build objects or run code: never construct them.
        if node.tag in allowed:
            return True
        line, col = _mark(node.start_mark)
        tag = node.tag.replace(_CORE, "!!")
        message = f'Got "{tag}" for {field_name(path)}: a plain YAML value; tags that build Python objects are refused.'
        self.errors.append((path, YamlError(line, col, message)))
        return False

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, object]:
        out: dict[str, object] = {}
        for key_node, value_node in node.value:
            line, col = _mark(key_node.start_mark)
            if key_node.tag == _CORE + "merge":
                message = (
                    f'Got "<<" for a key of {field_name(path)}: write the fields out; merge keys are not supported.'
                )
                self.errors.append((path, YamlError(line, col, message)))
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _CORE + "str":
                shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "a collection"
                message = f'Got "{shown!s:.40}" for a key of {field_name(path)}: keys are plain text.'
                self.errors.append((path, YamlError(line, col, message)))
                continue
            key = key_node.value
            if key in out:
                first = self.source.keys[path + (key,)]
                message = f'Got "{key}" for {field_name(path + (key,))}: each key once in a mapping (first at line {first[0]}).'
                self.errors.append((path + (key,), YamlError(line, col, message)))
                continue
            self.source.keys[path + (key,)] = (line, col)
            out[key] = self.build(value_node, path + (key,))
        return out
