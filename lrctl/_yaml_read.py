"""Reading a policy file's YAML within budgets: the text size, the nesting depth, the
number of nodes (so alias bombs cannot expand) and, where the controller asks, the
time (PyYAML is pure Python); only YAML's plain safe types are built, and every value
keeps its line for the errors (``file:line: key: message``)."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import yaml

from ._unicode import has_lone_surrogate

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "ConfigError", "YamlReader", "parse_deadline",
           "read_yaml"]

MAX_BYTES = 64 * 1024
MAX_DEPTH = 16
MAX_NODES = 5_000
# PyYAML follows YAML 1.1, where "1e-4" (no dot) is a string; people mean a number.
_FLOATISH = re.compile(r"^[-+]?(\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$")
_PLAIN_TAGS = frozenset({
    "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map", "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
})
_deadline = threading.local()  # .at: time.monotonic() past which parsing gives up


class ConfigError(ValueError):
    """A policy file is invalid. ``str(err)`` reads ``file:line: key: message``."""

    def __init__(self, source: str, line: int | None, key: str | None, message: str) -> None:
        self.source = source
        self.line = line
        self.key = key
        self.message = message
        # A dict has no lines of its own (the text parsed is lrctl's dump of it).
        where = f"{source}:{line}" if line and source != "<dict>" else source
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its constructor's arguments (the default passes ``self.args``, the
        # one formatted message, back to ``__init__``): a worker process of ``lrctl
        # bench`` can then raise one back to the parent.
        return type(self), (self.source, self.line, self.key, self.message), self.__dict__


@contextlib.contextmanager
def parse_deadline(seconds: float) -> Iterator[None]:
    """Within this block, parsing YAML on this thread gives up with a ``ConfigError`` once
    ``seconds`` have passed (PyYAML is pure Python: a hostile 64 KB text can take
    seconds; the controller parses hellos under a budget)."""
    _deadline.at = time.monotonic() + seconds
    _deadline.seconds = seconds
    try:
        yield
    finally:
        _deadline.at = None


class _OutOfTime(Exception):
    pass


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that checks the thread's :func:`parse_deadline` as it scans, and
    stops composing past ``MAX_NODES`` nodes (rather than building them all first)."""

    _nodes = 0

    def fetch_more_tokens(self) -> None:
        at = getattr(_deadline, "at", None)
        if at is not None and time.monotonic() > at:
            raise _OutOfTime
        super().fetch_more_tokens()

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise yaml.MarkedYAMLError(problem=f"more than {MAX_NODES} YAML nodes",
                                       problem_mark=self.peek_event().start_mark)
        return super().compose_node(parent, index)


class YamlReader:
    """Turns a composed YAML node tree into Python values, within budgets, keeping lines."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.nodes = 0
        self.lines: dict[int, int] = {}  # id(value) -> line, for containers
        self.key_lines: dict[int, dict[str, int]] = {}  # id(dict) -> key -> line
        self._constructor = yaml.constructor.SafeConstructor()

    @staticmethod
    def line(node: yaml.Node) -> int:
        return int(node.start_mark.line) + 1

    def _fail(self, node: yaml.Node, message: str, key: str | None = None) -> ConfigError:
        return ConfigError(self.source, self.line(node), key, message)

    def value(self, node: yaml.Node, depth: int) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self._fail(node, f"more than {MAX_NODES} YAML nodes (alias expansion?)")
        if depth > MAX_DEPTH:
            raise self._fail(node, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        if node.tag not in _PLAIN_TAGS:
            raise self._fail(node, f"YAML tag {node.tag!r} is not allowed in policy files")
        if isinstance(node, yaml.SequenceNode):
            items = [self.value(child, depth + 1) for child in node.value]
            self.lines[id(items)] = self.line(node)
            return items
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, depth)
        raise self._fail(node, f"unsupported YAML node {type(node).__name__}")

    def _mapping(self, node: yaml.MappingNode, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self._fail(key_node, "mapping keys must be plain strings")
            key = self._scalar(key_node)
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise self._fail(key_node, "merge keys (<<) are not supported")
            if not isinstance(key, str):
                raise self._fail(key_node, f"mapping keys must be strings, but got {key!r}")
            if key in out:
                raise self._fail(key_node, "duplicate key", key)
            lines[key] = self.line(key_node)
            out[key] = self.value(value_node, depth + 1)
        self.lines[id(out)] = self.line(node)
        self.key_lines[id(out)] = lines
        return out

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        if node.tag == "tag:yaml.org,2002:str" and node.style is None and _FLOATISH.fullmatch(
                node.value):
            return self._number(node, node.value)
        try:
            value = self._constructor.construct_object(node)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            raise self._fail(node, f"bad value {node.value[:40]!r}: {exc}") from None
        if isinstance(value, (bytes, bytearray)) or not isinstance(
                value, (str, int, float, bool, type(None))):
            raise self._fail(node, f"unsupported value type {type(value).__name__}")
        return value

    def _number(self, node: yaml.ScalarNode, text: str) -> float:
        try:
            # An overflow gives inf, which the knob's own check reports as not finite.
            return float(text.replace("_", ""))
        except ValueError:
            raise self._fail(node, f"bad number {text[:40]!r}") from None


def read_yaml(text: str, source: str) -> tuple[dict[str, Any], YamlReader]:
    """The top-level mapping of a policy file's text, and the reader that knows its lines."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_BYTES:
        raise ConfigError(source, None, None, f"text larger than {MAX_BYTES} bytes")
    try:
        root = yaml.compose(text, Loader=_Loader)
    except _OutOfTime:
        raise ConfigError(source, None, None, f"parsing took longer than the "
                          f"{_deadline.seconds:g} s allowed (a policy file is a few KB of "
                          "plain YAML)") from None
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError(source, line, None, f"YAML syntax: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, None, None, f"YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(source, None, None, "nesting too deep") from None
    if root is None:
        raise ConfigError(source, 1, None, "empty policy file")
    reader = YamlReader(source)
    doc = reader.value(root, 0)
    if has_lone_surrogate(doc):  # ("\ud800" in double quotes: see lrctl._unicode)
        raise ConfigError(source, None, None, "a string holds a lone UTF-16 surrogate "
                          "(an escape \\ud800-\\udfff alone): not Unicode text")
    if not isinstance(doc, dict):
        raise ConfigError(source, reader.line(root), None, "expected a mapping at the top level")
    return doc, reader
