"""Policy files: shipped ones build; bad ones fail with ``file:line: key: message``."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

import lrctl
from lrctl.config import ConfigError, parse_policy, parse_text

POLICIES = Path(__file__).resolve().parents[2] / "policies"
SHIPPED = sorted(p.name for p in POLICIES.glob("*.yaml"))


def test_policies_are_shipped() -> None:
    assert {"default.yaml", "plateau.yaml", "divergence.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("base_lrs", [[0.1], [3e-4, 1e-3, 0.02]])
def test_shipped_policy_validates_and_builds(name: str, base_lrs: list[float]) -> None:
    parsed = parse_policy(POLICIES / name)
    assert parsed.entries
    engine = parsed.build(base_lrs)
    assert len(engine.lrs) == len(base_lrs)
    assert engine.policy_sha256 == parsed.sha256
    assert engine.observe(step=0, loss=1.0, grad_norm=1.0)


def error_for(tmp_path: Path, text: str, base_lrs: list[float] | None = None) -> ConfigError:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        lrctl.load_policy(path, base_lrs=base_lrs or [0.1])
    err = info.value
    assert err.source == str(path)
    return err


HEAD = "version: 1\npolicies:\n  - kind: plateau\n"

# (case id, text, line, key, words the message must contain)
BAD_FILES: list[tuple[str, str, int, str, str]] = [
    ("unknown policy key", HEAD + "    patience: 3\n    fator: 0.5\n", 5, "fator",
     "unknown key"),
    ("misspelt policy key", HEAD + "    patiance: 3\n", 4, "patiance",
     "did you mean 'patience'?"),
    ("misspelt kind", "version: 1\npolicies:\n  - kind: divergance\n", 3, "kind",
     "did you mean 'divergence'?"),
    ("misspelt policies", "version: 1\npolices:\n  - kind: plateau\n", 2, "polices",
     "did you mean 'policies'?"),
    ("unknown top-level key", "version: 1\nmin_lrr: 0.1\npolicies:\n  - kind: plateau\n", 2,
     "min_lrr", "unknown key"),
    ("string for a float", HEAD + "    factor: \"abc\"\n", 4, "factor", "expected a number"),
    ("bare word for a float", HEAD + "    cooldown: 2\n    factor: abc\n", 5, "factor",
     "expected a number"),
    ("bool for an int", HEAD + "    patience: true\n", 4, "patience", "expected an integer"),
    ("fraction for an int", HEAD + "    patience: 2.5\n", 4, "patience", "expected an integer"),
    ("bool for a float", HEAD + "    factor: yes\n", 4, "factor", "expected a number"),
    ("number for a bool", "version: 1\npolicies:\n  - kind: divergence\n    watch_loss: 1\n", 4,
     "watch_loss", "true or false"),
    ("out of range, above", HEAD + "    factor: 2\n", 4, "factor", "< 1"),
    ("out of range, below", HEAD + "    patience: -1\n", 4, "patience", ">= 0"),
    ("not a choice", HEAD + "    mode: minimum\n", 4, "mode", "min, max"),
    (".nan", HEAD + "    threshold: .nan\n", 4, "threshold", "finite"),
    (".inf", HEAD + "    threshold: .inf\n", 4, "threshold", "finite"),
    ("1e400", HEAD + "    threshold: 1e400\n", 4, "threshold", "finite"),
    ("-1.0e+400", HEAD + "    min_lr: -1.0e+400\n", 4, "min_lr", "finite"),
    ("nan in a per-group list", HEAD + "    min_lr: [0.1, .nan]\n", 4, "min_lr", "finite"),
    ("top-level bad type", "version: 1\nmin_lr: abc\npolicies:\n  - kind: plateau\n", 2,
     "min_lr", "expected a number"),
    ("max_lr below min_lr", "version: 1\nmin_lr: 0.1\nmax_lr: 0.01\npolicies:\n"
     "  - kind: plateau\n", 3, "max_lr", ">= min_lr"),
    ("unsupported version", "version: 2\npolicies:\n  - kind: plateau\n", 1, "version",
     "unsupported"),
    ("unknown kind", "version: 1\npolicies:\n  - kind: warmup\n  - kind: platea\n", 4, "kind",
     "platea"),
    ("missing kind", "version: 1\npolicies:\n  - kind: warmup\n  - patience: 3\n", 4, "kind",
     "required"),
    ("missing version", "# no version\npolicies:\n  - kind: plateau\n", 1, "version",
     "required"),
    ("missing policies", "version: 1\nmode: active\n", 1, "policies", "required"),
    ("empty policies", "version: 1\npolicies: []\n", 2, "policies", "non-empty"),
    ("duplicate policy key", HEAD + "    factor: 0.5\n    patience: 4\n    factor: 0.2\n", 6,
     "factor", "duplicate"),
    ("duplicate top-level key", "version: 1\npolicies:\n  - kind: plateau\nversion: 1\n", 4,
     "version", "duplicate"),
    ("duplicate names", "version: 1\npolicies:\n  - kind: plateau\n    name: a\n"
     "  - kind: divergence\n    name: a\n", 6, "name", "duplicate"),
    ("explicit name equal to a default name", "version: 1\npolicies:\n  - kind: plateau\n"
     "  - kind: plateau\n    name: plateau\n", 5, "name", "duplicate"),
    ("missing knob required by a schedule", "version: 1\npolicies:\n  - kind: decay\n"
     "    schedule: step\n    step_size: 3\n", 3, "gamma", "required"),
    ("per-group list too long", HEAD + "    patience: 3\n    min_lr: [0.1, 0.2]\n", 5, "min_lr",
     "2 entries"),
]


@pytest.mark.parametrize(("text", "line", "key", "words"),
                         [pytest.param(*case[1:], id=case[0]) for case in BAD_FILES])
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, line: int, key: str,
                                       words: str) -> None:
    err = error_for(tmp_path, text)
    assert (err.line, err.key) == (line, key), str(err)
    assert str(err).startswith(f"{tmp_path / 'bad.yaml'}:{line}: {key}: "), str(err)
    assert words in err.message, str(err)


def test_unknown_kind_lists_known_kinds(tmp_path: Path) -> None:
    err = error_for(tmp_path, "version: 1\npolicies:\n  - kind: nope\n")
    for kind in ("cyclical", "decay", "divergence", "plateau", "warmup"):
        assert kind in err.message


def test_per_group_list_checked_against_the_optimizer(tmp_path: Path) -> None:
    text = "version: 1\npolicies:\n  - kind: cyclical\n    max_lr: [0.1, 0.2, 0.3]\n"
    err = error_for(tmp_path, text, base_lrs=[0.01, 0.02])
    assert (err.line, err.key) == (4, "max_lr")
    assert "3 entries" in err.message and "2 param group" in err.message
    path = tmp_path / "bad.yaml"
    assert len(lrctl.load_policy(path, base_lrs=[0.01, 0.02, 0.03]).lrs) == 3


@pytest.mark.parametrize(("text", "value"), [
    ("1e-4", 1e-4), ("5E-3", 5e-3), ("+2e-2", 2e-2), ("1.5e-4", 1.5e-4), ("1_0e-1", 1.0),
])
def test_exponent_without_dot_is_a_number(text: str, value: float) -> None:
    engine = lrctl.load_policy(HEAD + f"    threshold: {text}\n", base_lrs=[0.1])
    assert engine.policies[0].params["threshold"] == value


def test_quoted_exponent_stays_a_string() -> None:
    with pytest.raises(ConfigError, match="threshold: expected a number"):
        lrctl.load_policy(HEAD + "    threshold: '1e-4'\n", base_lrs=[0.1])


def test_dict_source_matches_yaml_source() -> None:
    text = HEAD + "    factor: 0.5\n    patience: 2\n"
    as_dict = {"version": 1, "policies": [{"kind": "plateau", "factor": 0.5, "patience": 2}]}
    a = lrctl.load_policy(text, base_lrs=[0.1])
    b = lrctl.load_policy(as_dict, base_lrs=[0.1])
    for t in range(10):
        assert a.observe(step=t, loss=1.0) == b.observe(step=t, loss=1.0)


# -- hostile input --------------------------------------------------------------

def billion_laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    names = "abcdefghi"
    for prev, name in itertools.pairwise(names):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\nversion: 1\npolicies: *i\n"


HOSTILE = {
    "billion laughs": billion_laughs(),
    "10 000-deep flow sequences": "version: 1\npolicies: " + "[" * 10_000 + "]" * 10_000,
    "10 000-deep flow mappings": "version: 1\npolicies: " + "{a: " * 10_000 + "1"
                                 + "}" * 10_000,
    "10 MB string": HEAD + "    metric: " + "a" * 10_000_000 + "\n",
    "17-deep block nesting": "version: 1\npolicies:\n" + "".join(
        "  " * i + "- \n" for i in range(1, 40)),
}


@pytest.mark.parametrize("text", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_text_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        lrctl.load_policy(text, base_lrs=[0.1])


@pytest.mark.parametrize("name", ["billion laughs", "10 000-deep flow sequences",
                                  "10 MB string"])
def test_hostile_file_is_a_config_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_text(HOSTILE[name])
    with pytest.raises(ConfigError) as info:
        lrctl.load_policy(path, base_lrs=[0.1])
    assert str(info.value).startswith(str(path))


def test_deeply_nested_dict_source_is_a_config_error() -> None:
    nested: Any = 1.0
    for _ in range(10_000):
        nested = [nested]
    with pytest.raises(ConfigError):
        lrctl.load_policy({"version": 1, "policies": nested}, base_lrs=[0.1])


def test_self_referencing_dict_source_is_a_config_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ConfigError):
        lrctl.load_policy({"version": 1, "policies": loop}, base_lrs=[0.1])


def test_not_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"version: 1\npolicies:\n  - kind: plateau\n    metric: caf\xe9\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        lrctl.load_policy(path, base_lrs=[0.1])


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        lrctl.load_policy(tmp_path / "nope.yaml", base_lrs=[0.1])


def test_int_too_long_to_convert_is_a_config_error() -> None:
    # Python refuses int("1" + 5000 zeros) (sys.get_int_max_str_digits): still a ConfigError.
    with pytest.raises(ConfigError) as info:
        lrctl.load_policy(HEAD + "    patience: 1" + "0" * 5000 + "\n", base_lrs=[0.1])
    assert info.value.line == 4


def test_a_name_or_kind_with_a_trailing_newline_is_refused() -> None:
    """``$`` matches before a final newline: names are checked whole (issue #18, item 10)."""
    import lrctl
    from lrctl.config import ConfigError
    from lrctl.policy import register_policy

    with pytest.raises(ConfigError, match="name"):
        lrctl.load_policy({"version": 1, "policies": [{"kind": "divergence",
                                                       "name": "guard\n"}]}, [0.1])
    with pytest.raises(ValueError):
        register_policy("loss_cap\n")


def test_a_dict_policy_error_names_no_line() -> None:
    """A dict has no lines: the error names the key, not a line of lrctl's own dump."""
    with pytest.raises(ConfigError) as info:
        lrctl.load_policy({"version": 1, "policies": [{"kind": "plateau", "fator": 0.5}]},
                          [0.1])
    assert info.value.source == "<dict>"
    assert str(info.value).startswith("<dict>: fator: unknown key")


def test_load_policy_none_is_the_shipped_default_as_for_attach() -> None:
    """attach(policy=None) meant the shipped default; load_policy(None) raised TypeError."""
    import lrctl
    from lrctl._defaults import DEFAULT_POLICY

    a, b = lrctl.load_policy(None, [0.1]), lrctl.load_policy(DEFAULT_POLICY, [0.1])
    for t in range(50):
        assert a.observe(t, 1.0 / (t + 1), 1.0) == b.observe(t, 1.0 / (t + 1), 1.0)
    assert a.policy_sha256 == b.policy_sha256


@pytest.mark.parametrize(("body", "line", "key"), [
    # A newcomer's find: the problem said was not the first in the file.
    ("  - kind: plateau\n    factor: 1.5\n    patiense: 3\n  - kind: warmpu\n", 4, "factor"),
    ("  - kind: plateau\n    patiense: 3\n    factor: 1.5\n", 4, "patiense"),
    ("  - kind: warmpu\n  - kind: plateau\n    factor: 1.5\n", 3, "kind"),
    ("  - kind: plateau\n    factor: 1.5\n  - kind: warmup\n    name: plateau\n", 4, "factor"),
])
def test_the_first_problem_in_the_file_is_the_one_said(body: str, line: int, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_text("version: 1\npolicies:\n" + body, "p.yaml")
    assert (err.value.line, err.value.key) == (line, key)
