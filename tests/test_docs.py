"""The README documents every knob, with its real default."""

from __future__ import annotations

from pathlib import Path

import pytest

from lrctl.config import _TOP_LEVEL
from lrctl.policy import available_kinds, get_policy_class
from lrctl.policy._params import Param

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BUILTIN = ["warmup", "decay", "cyclical", "plateau", "divergence", "earlystop", "wsd"]


def _default_text(p: Param) -> str:
    if p.default is None:
        return "—"
    if isinstance(p.default, bool):
        return str(p.default).lower()
    return f"`{p.default}`"


@pytest.mark.parametrize("kind", BUILTIN)
def test_readme_lists_every_knob_with_its_default(kind: str) -> None:
    section = README.split(f"#### `kind: {kind}`", 1)[1].split("####", 1)[0]
    for p in get_policy_class(kind).PARAMS:
        assert f"| `{p.name}` | {_default_text(p)} |" in section, (kind, p.name)


def test_readme_lists_file_level_keys() -> None:
    section = README.split("#### File level", 1)[1].split("####", 1)[0]
    for p in _TOP_LEVEL:
        assert f"| `{p.name}` |" in section, p.name


def test_every_builtin_kind_is_documented() -> None:
    assert set(BUILTIN) <= set(available_kinds())
