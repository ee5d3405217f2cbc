"""A training job the resume tests run as a subprocess, and kill.

    python hf_job.py OUT --steps 16 --save-steps 4 --lr-log lrs.txt [--exit-at 6]
                     [--exit-after-save 4] [--resume] [--base loop] [--mlflow]

``--exit-at N`` ends the process with ``os._exit`` right after optimizer step N
(no cleanup, as a preempted or OOM-killed job); ``--exit-after-save N`` right
after the checkpoint of step N is written. ``--resume`` continues from the
latest checkpoint in OUT. Each optimizer step appends ``step lr`` to the LR log.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_common import UsedLR, make_trainer
from integ_common import POLICY

from lrctl.integrations.hf import LrctlCallback

EXIT_CODE = 3


class ExitAt(TrainerCallback):
    def __init__(self, step: int | None, after_save: int | None) -> None:
        self.step, self.after_save = step, after_save

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            os._exit(EXIT_CODE)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.after_save:
            os._exit(EXIT_CODE)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--lr-log", type=Path, required=True)
    parser.add_argument("--exit-at", type=int)
    parser.add_argument("--exit-after-save", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--base", default="controller")
    parser.add_argument("--mlflow", action="store_true")
    args = parser.parse_args()

    callbacks = [LrctlCallback(policy=POLICY, run_name="hf-job", timeout=30.0, base=args.base),
                 UsedLR(args.lr_log), ExitAt(args.exit_at, args.exit_after_save)]
    trainer = make_trainer(args.out, args.steps, callbacks, save_strategy="steps",
                           save_steps=args.save_steps,
                           report_to=["mlflow"] if args.mlflow else [])
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    ctl = callbacks[0].controller  # type: ignore[attr-defined]
    print(f"lrctl run {ctl.run_key} ended at step {ctl.steps_taken - 1}")


if __name__ == "__main__":
    main()
