"""One peer that sends thousands of messages at once cannot stall the others: the
controller handles at most ``Limits.max_messages_per_wake`` of one peer's messages
per wake-up, serves the other peers, then goes on with the rest (issue #18: 2 000
``status`` requests in one write stalled every run for 0.4 s)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon_helpers import Client, serving

from lrctl.daemon import Limits
from lrctl.daemon.store import StateStore
from lrctl.protocol import MAX_HELLO, encode, encode_obs

POLICY = "version: 1\npolicies:\n  - kind: divergence\n"
FLOOD = 2000


def test_a_flood_of_requests_is_served_in_shares_with_other_peers_in_between(
        tmp_path: Path) -> None:
    limits = Limits(max_messages_per_wake=64)
    with serving(str(tmp_path / "c.sock"), StateStore(tmp_path / "state"),
                 limits=limits) as (srv, path):
        hook = Client(path)
        hook.send(encode({"t": "hello", "run": "ref", "run_name": "ref", "lrs": [0.1],
                          "groups": 1, "policy": {"text": POLICY, "source": "<test>"}},
                         MAX_HELLO))
        assert hook.answer()["t"] == "welcome"
        handled: list[tuple[str, str]] = []
        handle = srv.handle

        def recording(conn: Any, msg: dict[str, Any]) -> None:
            handled.append((conn.label, msg["t"]))
            handle(conn, msg)
        srv.handle = recording  # type: ignore[method-assign]

        flood = Client(path)
        flood.send(encode({"t": "status"}) * FLOOD)
        assert flood.answer()["t"] == "status"  # the loop is at work on the flood
        hook.send(encode_obs(0, 1.0, 1.0))
        assert hook.answer()["t"] == "lr"
        answers = 1 + sum(flood.answer()["t"] == "status" for _ in range(FLOOD - 1))
        assert answers == FLOOD  # every request answered, in order, none dropped
        statuses = [i for i, (_, t) in enumerate(handled) if t == "status"]
        obs = handled.index(("ref", "obs"))
        assert len(statuses) == FLOOD
        assert statuses[0] < obs < statuses[-1]  # the hook was served in between
        # ... within a few shares of the flood, not after it
        assert sum(i < obs for i in statuses) <= 4 * limits.max_messages_per_wake
