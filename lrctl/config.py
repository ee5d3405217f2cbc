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

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from ._sources import looks_like_path, missing_policy_hint, resolve_policy_path
from ._yaml_read import (
    MAX_BYTES,
    MAX_DEPTH,
    MAX_NODES,
    ConfigError,
    YamlReader,
    parse_deadline,
    read_yaml,
)
from .paths import read_regular
from .policy import Engine, ParamError, Policy, get_policy_class
from .policy._capacity import check_kept
from .policy._engine import unique_names
from .policy._params import Param, bind_params, did_you_mean

__all__ = ["ConfigError", "PolicyEntry", "PolicyFile", "load_policy", "parse_deadline",
           "parse_policy"]

MAX_POLICIES = 64
SUPPORTED_VERSIONS = (1,)
#: Top-level keys too far from "policies" for did_you_mean, meant as it all the same.
_LIKE_POLICIES = frozenset({"policy", "policys", "rules", "stack", "schedulers"})

_TOP_LEVEL = (
    Param("version", "int", 1, "format version (1)"),
    Param("mode", "str", "active", "active, or shadow (record, do not act)",
          choices=("active", "shadow")),
    Param("min_lr", "float", 0.0, "lower clamp of every group's LR", ge=0),
    Param("max_lr", "float", None, "upper clamp of every group's LR", gt=0, optional=True),
    Param("watch", "bool", True, "hot-reload the file while runs use it"),
)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.#-]{0,63}$")


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
            restart = policy.params.get("restart_lr") if entry.kind == "plateau" else None
            if restart is not None and self.max_lr is not None and restart > self.max_lr:
                # (clamped to max_lr, each restart would find the LR at the floor again,
                # and multiply on until the multiplier overflowed)
                raise ParamError("restart_lr", f"must be <= the file's max_lr "
                                               f"{self.max_lr:g}, but got {restart:g}")
            if groups is not None:
                check_group_lists(policy, groups)
        except ParamError as exc:
            line = entry.key_lines.get(exc.key, entry.line)
            raise ConfigError(self.source, line, exc.key, exc.message) from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(self.source, entry.line, entry.kind, str(exc)) from None
        except Exception as exc:  # (a knob no check caught, a plugin's bug): not a policy
            raise ConfigError(self.source, entry.line, entry.kind,
                              f"the policy cannot be built with these knobs: {exc!r}") from None
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
        return parse_file(resolve_policy_path(source))
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
    try:  # (a regular file only: a FIFO there would hang lrctl validate)
        data = read_regular(path, MAX_BYTES + 1, follow=True)
    except OSError as exc:
        hint = f"; {missing_policy_hint()}" if isinstance(exc, FileNotFoundError) else ""
        raise ConfigError(path, None, None,
                          f"cannot read: {exc.strerror or exc}{hint}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(path, None, None, f"file larger than {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, None, f"not UTF-8 text ({exc.reason})") from None
    return parse_text(text, path)


def parse_text(text: str, source: str = "<string>") -> PolicyFile:
    doc, reader = read_yaml(text, source)
    return _validate(doc, reader, text, source)


def _validate(doc: dict[str, Any], reader: YamlReader, text: str, source: str) -> PolicyFile:
    top_lines = reader.key_lines[id(doc)]
    if "version" not in doc:
        raise ConfigError(source, 1, "version", "required (supported: "
                          f"{', '.join(map(str, SUPPORTED_VERSIONS))}): start the file with "
                          "'version: 1'")
    if "policies" not in doc:
        for key in doc:  # a misspelt "policies:" is said where it is
            hint = did_you_mean(str(key), ["policies"]) or (
                "; did you mean 'policies'?" if str(key).lower() in _LIKE_POLICIES else "")
            if hint:
                raise ConfigError(source, top_lines.get(key), str(key),
                                  f"unknown key for the policy file{hint}")
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
    # Every entry is checked, and the first problem in the file is the one said.
    entries: list[PolicyEntry] = []
    errors: list[ConfigError] = []
    for item in policies:
        try:
            entries.append(_entry(item, reader, source, top_lines["policies"]))
        except ConfigError as exc:
            errors.append(exc)
    if not errors:
        try:
            _name_entries(entries, source)
        except ConfigError as exc:
            errors.append(exc)
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
    built = []
    for entry in parsed.entries:  # knobs now; the per-group list lengths wait for build()
        try:
            built.append(parsed._make(entry, groups=None))
        except ConfigError as exc:
            errors.append(exc)
    try:  # (lrctl validate and --policies say so too, not only the engine a run builds)
        check_kept(built)
    except ValueError as exc:
        errors.append(ConfigError(source, None, "policies", str(exc)))
    if errors:
        raise min(errors, key=lambda e: e.line if e.line is not None else 1 << 62)
    return parsed


def _entry(item: Any, reader: YamlReader, source: str, list_line: int) -> PolicyEntry:
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
    if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
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


def describe_kinds() -> str:
    """Every registered kind and its knobs, for ``lrctl validate --kinds``."""
    from .policy import available_kinds

    lines = []
    for kind in available_kinds():
        cls = get_policy_class(kind)
        lines.append(f"{kind} ({cls.role}):")
        lines.extend(f"  {p.describe()}" for p in cls.PARAMS)
    return "\n".join(lines)

