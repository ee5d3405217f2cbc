"""Policy files: YAML text → a validated policy stack.

Errors name the file, the line and the key: ``policies/x.yaml:7: factor: must be
< 1, but got 2``. Parsing is bounded: the text size, the nesting depth and the
number of nodes (so alias bombs cannot expand) are all capped, and only YAML's
safe types are built.

The format (``version: 1``)::

    version: 1            # required
    mode: active          # or shadow: decide and record, but do not act
    min_lr: 0.0           # clamp of every group's LR
    max_lr: null          # no upper clamp unless given
    watch: true           # hot-reload this file while runs use it
    policies:             # required, acted on in the documented order
      - kind: warmup      # a registered kind
        name: warmup      # optional, unique; identifies the policy across reloads
        steps: 200        # the kind's knobs
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from ._sources import looks_like_path
from .policy import Engine, ParamError, Policy, get_policy_class
from .policy._engine import unique_names
from .policy._params import Param, bind_params

__all__ = ["ConfigError", "PolicyEntry", "PolicyFile", "load_policy", "parse_deadline",
           "parse_policy"]

MAX_BYTES = 64 * 1024
MAX_DEPTH = 16
MAX_NODES = 5_000
MAX_POLICIES = 64
SUPPORTED_VERSIONS = (1,)

_TOP_LEVEL = (
    Param("version", "int", 1, "format version (1)"),
    Param("mode", "str", "active", "active, or shadow (record, do not act)",
          choices=("active", "shadow")),
    Param("min_lr", "float", 0.0, "lower clamp of every group's LR", ge=0),
    Param("max_lr", "float", None, "upper clamp of every group's LR", gt=0, optional=True),
    Param("watch", "bool", True, "hot-reload the file while runs use it"),
)
# PyYAML follows YAML 1.1, where "1e-4" (no dot) is a string; people mean a number.
_FLOATISH = re.compile(r"^[-+]?(\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$")
_PLAIN_TAGS = frozenset({
    "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map", "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
})
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.#-]{0,63}$")
_deadline = threading.local()  # .at: time.monotonic() past which parsing gives up


class ConfigError(ValueError):
    """A policy file is invalid. ``str(err)`` reads ``file:line: key: message``."""

    def __init__(self, source: str, line: int | None, key: str | None, message: str) -> None:
        self.source = source
        self.line = line
        self.key = key
        self.message = message
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


@dataclass(frozen=True)
class PolicyEntry:
    name: str
    kind: str
    params: Mapping[str, Any]
    line: int
    key_lines: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyFile:
    """A parsed, validated policy file (no LRs bound yet)."""

    source: str
    text: str
    sha256: str
    mode: str
    min_lr: float
    max_lr: float | None
    watch: bool
    entries: tuple[PolicyEntry, ...]

    def build(self, base_lrs: Sequence[float], total_steps: int | None = None) -> Engine:
        """An :class:`~lrctl.policy.Engine` for an optimizer with these initial LRs
        (``total_steps``: the run's length, when known; ``anneal`` needs it)."""
        policies = [self._make(entry, len(base_lrs)) for entry in self.entries]
        try:
            return Engine(policies, base_lrs, names=[e.name for e in self.entries],
                          min_lr=self.min_lr, max_lr=self.max_lr, mode=self.mode,
                          policy_sha256=self.sha256, total_steps=total_steps)
        except ValueError as exc:
            raise ConfigError(self.source, None, None, str(exc)) from None

    def _make(self, entry: PolicyEntry, groups: int | None) -> Policy:
        """Build one policy; ``groups=None`` checks the knobs without LRs bound."""
        cls = get_policy_class(entry.kind)
        try:
            policy = cls(**entry.params)
            if groups is not None:
                check_group_lists(policy, groups)
        except ParamError as exc:
            line = entry.key_lines.get(exc.key, entry.line)
            raise ConfigError(self.source, line, exc.key, exc.message) from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(self.source, entry.line, entry.kind, str(exc)) from None
        return policy


def check_group_lists(policy: Policy, groups: int) -> None:
    """Per-group knobs given as lists must have one entry per param group."""
    for p in policy.PARAMS:
        value = policy.params.get(p.name)
        if p.kind == "float_or_list" and isinstance(value, list) and len(value) != groups:
            raise ParamError(p.name, f"has {len(value)} entries but the optimizer has "
                                     f"{groups} param group(s)")


def load_policy(source: str | os.PathLike[str] | Mapping[str, Any],
                base_lrs: Sequence[float], total_steps: int | None = None) -> Engine:
    """An in-process engine from a path, YAML text or a dict (no controller needed).

    >>> engine = load_policy({"version": 1, "policies": [{"kind": "plateau"}]}, [0.1])
    >>> engine.observe(step=0, loss=1.0)
    [0.1]
    """
    return parse_policy(source).build(base_lrs, total_steps)


def parse_policy(source: str | os.PathLike[str] | Mapping[str, Any]) -> PolicyFile:
    """Parse and validate a path, YAML text or a dict, without binding LRs."""
    if isinstance(source, Mapping):
        _check_plain_data(source, "<dict>")
        text = yaml.safe_dump(dict(source), sort_keys=False)
        return parse_text(text, "<dict>")
    if isinstance(source, os.PathLike) or (isinstance(source, str) and looks_like_path(source)):
        return parse_file(os.fspath(source))
    if isinstance(source, str):
        return parse_text(source, "<string>")
    raise TypeError(f"policy must be a path, YAML text or a dict, but got {type(source).__name__}")


def _check_plain_data(root: Any, source: str) -> None:
    """Bound a dict source as YAML text is bounded: nodes, depth, size; plain types only."""
    budget = MAX_BYTES
    stack: list[tuple[Any, int]] = [(root, 0)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise ConfigError(source, None, None, f"more than {MAX_NODES} values")
        if depth > MAX_DEPTH:
            raise ConfigError(source, None, None, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, Mapping):
            stack.extend((k, depth + 1) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            budget -= len(value)
            if budget < 0:
                raise ConfigError(source, None, None, f"larger than {MAX_BYTES} bytes")
        elif value is not None and not isinstance(value, (bool, int, float)):
            raise ConfigError(source, None, None,
                              f"unsupported value of type {type(value).__name__}")


def parse_file(path: str) -> PolicyFile:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, None, None, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(path, None, None, f"file larger than {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, None, f"not UTF-8 text ({exc.reason})") from None
    return parse_text(text, path)


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
        return super().compose_node(parent, index)  # type: ignore[no-any-return]


def parse_text(text: str, source: str = "<string>") -> PolicyFile:
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
    reader = _Reader(source)
    doc = reader.value(root, 0)
    if not isinstance(doc, dict):
        raise ConfigError(source, reader.line(root), None, "expected a mapping at the top level")
    return _validate(doc, reader, text, source)


def _validate(doc: dict[str, Any], reader: _Reader, text: str, source: str) -> PolicyFile:
    top_lines = reader.key_lines[id(doc)]
    if "version" not in doc:
        raise ConfigError(source, 1, "version", f"required (supported: {SUPPORTED_VERSIONS})")
    if "policies" not in doc:
        raise ConfigError(source, 1, "policies", "required: a list of policies")
    settings = {k: v for k, v in doc.items() if k != "policies"}
    try:
        top = bind_params("policy file", _TOP_LEVEL, settings)
    except ParamError as exc:
        raise ConfigError(source, top_lines.get(exc.key), exc.key, exc.message) from None
    if top["version"] not in SUPPORTED_VERSIONS:
        raise ConfigError(source, top_lines["version"], "version",
                          f"unsupported version {top['version']} (supported: "
                          f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    if top["max_lr"] is not None and top["max_lr"] < top["min_lr"]:
        raise ConfigError(source, top_lines["max_lr"], "max_lr", "must be >= min_lr")
    policies = doc["policies"]
    if not isinstance(policies, list) or not policies:
        raise ConfigError(source, top_lines["policies"], "policies",
                          "expected a non-empty list of policies")
    if len(policies) > MAX_POLICIES:
        raise ConfigError(source, top_lines["policies"], "policies",
                          f"at most {MAX_POLICIES} policies")
    entries = [_entry(item, reader, source, top_lines["policies"]) for item in policies]
    _name_entries(entries, source)
    parsed = PolicyFile(
        source=source,
        text=text,
        sha256=hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
        mode=top["mode"],
        min_lr=top["min_lr"],
        max_lr=top["max_lr"],
        watch=top["watch"],
        entries=tuple(entries),
    )
    for entry in parsed.entries:  # knobs now; the per-group list lengths wait for build()
        parsed._make(entry, groups=None)
    return parsed


def _entry(item: Any, reader: _Reader, source: str, list_line: int) -> PolicyEntry:
    if not isinstance(item, dict):
        raise ConfigError(source, reader.lines.get(id(item), list_line), "policies",
                          "each policy must be a mapping with a 'kind'")
    lines = reader.key_lines[id(item)]
    line = min(lines.values()) if lines else list_line
    kind = item.get("kind")
    if not isinstance(kind, str):
        raise ConfigError(source, lines.get("kind", line), "kind",
                          "required: the policy's kind (a string)")
    try:
        get_policy_class(kind)
    except ValueError as exc:
        raise ConfigError(source, lines["kind"], "kind", str(exc)) from None
    name = item.get("name")
    if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
        raise ConfigError(source, lines["name"], "name",
                          f"expected a short name (letters, digits, _.#-), but got {name!r}")
    params = {k: v for k, v in item.items() if k not in ("kind", "name")}
    return PolicyEntry(name=name or "", kind=kind, params=params, line=line, key_lines=lines)


def _name_entries(entries: list[PolicyEntry], source: str) -> None:
    defaults = unique_names([e.kind for e in entries])
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        name = entry.name or defaults[i]
        if name in seen:
            raise ConfigError(source, entry.key_lines.get("name", entry.line), "name",
                              f"duplicate policy name {name!r}")
        seen.add(name)
        entries[i] = PolicyEntry(name, entry.kind, entry.params, entry.line, entry.key_lines)


class _Reader:
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
        if node.tag == "tag:yaml.org,2002:str" and node.style is None and _FLOATISH.match(
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


def describe_kinds() -> str:
    """Every registered kind and its knobs, for ``lrctl validate --kinds``."""
    from .policy import available_kinds

    lines = []
    for kind in available_kinds():
        cls = get_policy_class(kind)
        lines.append(f"{kind} ({cls.role}):")
        lines.extend(f"  {p.describe()}" for p in cls.PARAMS)
    return "\n".join(lines)

