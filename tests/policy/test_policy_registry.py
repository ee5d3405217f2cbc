"""The kind registry, the YAML sandbox, and the light ``import lrctl``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import lrctl
from lrctl.config import ConfigError
from lrctl.policy import (
    Action,
    Observation,
    Param,
    Policy,
    StepContext,
    available_kinds,
    get_policy_class,
    register_policy,
    unregister_policy,
)

USER_KIND = "test_every_third_halves"
BUILTINS = ("cyclical", "decay", "divergence", "plateau", "warmup")


class EveryThirdHalves(Policy):
    """A user policy: multiply the LR by ``factor`` on every ``every``-th observation."""

    PARAMS = (Param("factor", "float", 0.5, "multiplier", gt=0, le=1),
              Param("every", "int", 3, "period in observations", ge=1))

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.seen = 0
        self.scale = 1.0

    def multiplier(self) -> float:
        return self.scale

    def observe(self, obs: Observation, ctx: StepContext) -> list[Action]:
        self.seen += 1
        if self.seen % self.params["every"]:
            return []
        self.scale *= self.params["factor"]
        return [Action("reduce", "every third", {"statistic": "observations",
                                                 "value": self.seen, "threshold": 3})]

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "scale": self.scale}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seen, self.scale = int(state["seen"]), float(state["scale"])


@pytest.fixture
def user_kind() -> Iterator[type[Policy]]:
    cls = register_policy(USER_KIND)(EveryThirdHalves)
    try:
        yield cls
    finally:
        unregister_policy(USER_KIND)


def test_registered_user_kind_is_usable_from_yaml(user_kind: type[Policy]) -> None:
    assert USER_KIND in available_kinds()
    assert get_policy_class(USER_KIND) is user_kind
    text = f"version: 1\npolicies:\n  - kind: warmup\n    steps: 2\n  - kind: {USER_KIND}\n" \
           "    factor: 0.25\n"
    engine = lrctl.load_policy(text, base_lrs=[1.0])
    lrs = [engine.observe(step=t, loss=1.0)[0] for t in range(6)]
    assert lrs == pytest.approx([0.01 + 0.99 / 2, 1.0, 0.25, 0.25, 0.25, 0.0625])
    assert [d.kind for d in engine.decisions if d.action == "reduce"] == [USER_KIND] * 2


def test_user_kind_knobs_are_validated_with_lines(user_kind: type[Policy]) -> None:
    text = f"version: 1\npolicies:\n  - kind: {USER_KIND}\n    every: 0\n"
    with pytest.raises(ConfigError) as info:
        lrctl.load_policy(text, base_lrs=[1.0])
    assert (info.value.line, info.value.key) == (4, "every")


def test_unregistered_kind_is_gone(user_kind: type[Policy]) -> None:
    unregister_policy(USER_KIND)
    assert USER_KIND not in available_kinds()
    with pytest.raises(ValueError, match="unknown policy kind"):
        get_policy_class(USER_KIND)


def test_duplicate_kind_raises(user_kind: type[Policy]) -> None:
    class Other(EveryThirdHalves):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_policy(USER_KIND)(Other)
    assert get_policy_class(USER_KIND) is user_kind
    assert "kind" not in vars(Other)  # a refused registration leaves the class alone


@pytest.mark.parametrize("kind", BUILTINS)
def test_builtin_kind_cannot_be_taken(kind: str) -> None:
    class Impostor(EveryThirdHalves):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_policy(kind)(Impostor)
    assert get_policy_class(kind) is not Impostor


def test_builtin_kind_cannot_be_taken_before_builtins_load() -> None:
    """In a fresh process the built-ins are not imported yet; the name is still taken."""
    code = textwrap.dedent("""
        import lrctl
        from lrctl.policy import Policy, register_policy

        class Impostor(Policy):
            def observe(self, obs, ctx): return []
            def state_dict(self): return {}
            def load_state_dict(self, state): pass

        try:
            register_policy("plateau")(Impostor)
        except ValueError:
            print("refused")
        else:
            print("accepted")
        print(sorted(lrctl.policy.available_kinds()))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.splitlines()[:1] == ["refused"], result.stdout + result.stderr
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("kind", "cls", "error"), [
    ("Bad-Name", EveryThirdHalves, ValueError),
    ("", EveryThirdHalves, ValueError),
    ("x" * 65, EveryThirdHalves, ValueError),
    ("test_not_a_policy", dict, TypeError),
])
def test_bad_registrations_are_refused(kind: str, cls: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        register_policy(kind)(cls)
    assert kind not in available_kinds()


def test_unknown_kind_error_lists_known_kinds() -> None:
    with pytest.raises(ValueError, match="unknown policy kind 'nope'") as info:
        get_policy_class("nope")
    for kind in BUILTINS:
        assert kind in str(info.value)


# -- a YAML file cannot import anything -------------------------------------------

SENTINEL = "lrctl_test_sentinel_module"


@pytest.fixture
def sentinel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module that, if ever imported, leaves a file behind."""
    marker = tmp_path / "imported"
    (tmp_path / f"{SENTINEL}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "class Thing:\n    pass\n"
        "def boom(*args):\n    return {'kind': 'plateau'}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, SENTINEL, raising=False)
    return marker


TAGGED = {
    "object/apply on the list": f"policies: !!python/object/apply:{SENTINEL}.boom []\n",
    "object/apply on an entry": f"policies:\n  - !!python/object/apply:{SENTINEL}.boom []\n",
    "object on an entry": f"policies:\n  - !!python/object:{SENTINEL}.Thing {{kind: plateau}}\n",
    "object/new on an entry": f"policies:\n  - !!python/object/new:{SENTINEL}.Thing "
                              "{kind: plateau}\n",
    "name on a knob": "policies:\n  - kind: plateau\n"
                      f"    metric: !!python/name:{SENTINEL}.boom ''\n",
    "module on a knob": "policies:\n  - kind: plateau\n"
                        f"    metric: !!python/module:{SENTINEL} ''\n",
    "tuple on a knob": "policies:\n  - kind: plateau\n    min_lr: !!python/tuple [0.1]\n",
}


@pytest.mark.parametrize("body", list(TAGGED.values()), ids=list(TAGGED))
def test_python_tags_are_rejected_and_import_nothing(sentinel: Path, body: str) -> None:
    with pytest.raises(ConfigError) as info:
        lrctl.load_policy("version: 1\n" + body, base_lrs=[0.1])
    assert info.value.line is not None and info.value.line >= 2, str(info.value)
    assert not sentinel.exists()
    assert SENTINEL not in sys.modules


# -- light import ----------------------------------------------------------------

def test_import_lrctl_is_light() -> None:
    code = textwrap.dedent("""
        import sys
        import lrctl
        import lrctl.policy
        from lrctl.policy import Engine, available_kinds, get_policy_class
        kinds = available_kinds()
        engine = Engine([get_policy_class("divergence")(), get_policy_class("plateau")()],
                        base_lrs=[0.1])
        engine.observe(step=0, loss=1.0, grad_norm=1.0)
        heavy = ("torch", "mlflow", "watchdog", "yaml")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
        print(",".join(loaded) or "none")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"


def test_a_role_is_its_name_as_a_string() -> None:
    """``Role`` is a ``str`` enum that works on Python 3.10 (``enum.StrEnum`` is 3.11's):
    it equals, prints, formats and serialises as its name, as user policies compare it."""
    import json

    from lrctl.policy import Role

    for role, name in ((Role.SCHEDULE, "schedule"), (Role.REACTIVE, "reactive")):
        assert role == name and hash(role) == hash(name)
        assert (str(role), f"{role}", f"[{role:>9}]") == (name, name, f"[{name:>9}]")
        assert json.dumps({"role": role}) == json.dumps({"role": name})
    out = subprocess.run([sys.executable, "-m", "lrctl", "validate", "--kinds"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "warmup (schedule):" in out.stdout, out.stdout[:400]
