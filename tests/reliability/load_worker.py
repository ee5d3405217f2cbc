"""One load-test process: N runs over raw protocol connections, in lock step.

``python load_worker.py SOCKET PREFIX RUNS STEPS``; prints one JSON line of
results. Every observation's answer is checked against an in-process engine
fed the same values.
"""

from __future__ import annotations

import json
import random
import sys

from rel_helpers import RawClient, hello

import lrctl

POLICY = ("version: 1\npolicies:\n  - kind: divergence\n  - kind: plateau\n    metric: loss\n"
          "    patience: 20\n    factor: 0.7\n    cooldown: 5\n")


def main() -> None:
    path, prefix, runs, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    clients, engines, rngs = [], [], []
    for i in range(runs):
        c = RawClient(path)
        c.send(hello(f"{prefix}-{i}", POLICY, [0.1, 0.01]))
        assert c.answer()["t"] == "welcome"
        clients.append(c)
        engines.append(lrctl.load_policy(POLICY, [0.1, 0.01]))
        rngs.append(random.Random(f"{prefix}-{i}"))
    answered = mismatched = 0
    decisions = [0] * runs
    for t in range(steps):
        values = [1.0 + r.random() * 0.1 for r in rngs]
        for c, v in zip(clients, values, strict=True):
            c.obs(t, v, 1.0)
        for i, (c, v) in enumerate(zip(clients, values, strict=True)):
            reply = c.answer()
            want = engines[i].observe(t, v, 1.0)
            answered += reply.get("s") == t
            mismatched += reply.get("lrs") != want
            decisions[i] += len(reply.get("d", []))
    expected = sum(len(e.decisions) for e in engines)
    for c in clients:
        c.send({"t": "bye"})
        c.close()
    print(json.dumps({"answered": answered, "mismatched": mismatched,
                      "decisions": sum(decisions), "expected_decisions": expected}))


if __name__ == "__main__":
    main()
