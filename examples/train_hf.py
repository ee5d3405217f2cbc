"""A Hugging Face ``Trainer`` run with lrctl owning the learning rate.

A tiny GPT-2 built from a config object (no download) learns characters of
Python's standard library source. The only lrctl line is the callback. It
observes every optimizer step (the loss and grad norm the Trainer computed,
however often it logs), holds the Trainer's scheduler, so the
``learning_rate`` the Trainer logs is the LR lrctl chose, and skips a step
whose loss is NaN. With ``--keep-schedule`` the Trainer's linear warmup and
decay stay, and lrctl's policies scale them. With ``--save-steps`` each
checkpoint keeps the lrctl run; ``--resume`` continues it from the latest one.

    python examples/train_hf.py --steps 200
    python examples/train_hf.py --steps 200 --save-steps 50   # stop it, then:
    python examples/train_hf.py --steps 200 --save-steps 50 --resume
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from lrctl.integrations.hf import LrctlCallback


def char_dataset(context: int, max_chars: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Windows of stdlib source as character ids (a character-level tokenizer)."""
    text = "".join(p.read_text(encoding="utf-8", errors="replace")
                   for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("a*.py")))
    text = text[:max_chars]
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([vocab[c] for c in text])
    rows = [{"input_ids": ids[s:s + context], "labels": ids[s:s + context]}
            for s in range(0, len(ids) - context, context)]
    return rows, len(vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--policy", default=None, help="policy file (default: lrctl's default)")
    parser.add_argument("--output-dir", default="hf-out")
    parser.add_argument("--keep-schedule", action="store_true",
                        help="keep the Trainer's linear warmup and decay; lrctl scales it")
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps")
    parser.add_argument("--resume", action="store_true", help="from the latest checkpoint")
    args = parser.parse_args()

    torch.manual_seed(0)
    train, vocab = char_dataset(context=64, max_chars=200_000)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    lrctl_callback = LrctlCallback(policy=args.policy, run_name="train-hf",  # ← lrctl
                                   base="loop" if args.keep_schedule else "controller")
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=16,
        learning_rate=args.lr, logging_steps=1,  # for the print below; lrctl sees every step
        lr_scheduler_type="linear" if args.keep_schedule else "constant",
        warmup_steps=0.1 if args.keep_schedule else 0,
        max_grad_norm=1.0, save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500, report_to=[], use_cpu=True,
        disable_tqdm=True, log_level="warning", seed=0)
    trainer = Trainer(model=model, args=training_args, train_dataset=train,
                      callbacks=[lrctl_callback])
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    ctl = lrctl_callback.controller
    assert ctl is not None
    logged = {h["step"]: h["learning_rate"] for h in trainer.state.log_history
              if "learning_rate" in h}
    first, last = min(logged), max(logged)
    print(f"the Trainer logged learning_rate {logged[first]:.3g} at step {first} … "
          f"{logged[last]:.3g} at step {last}: the LRs lrctl set")
    print(f"lrctl run {ctl.run_key}: {ctl.steps_taken - 1} steps, final lr {ctl.lr[0]:.3g}")
    print(f"  {len(ctl.decisions)} decision(s){':' if ctl.decisions else ''}")
    for d in ctl.decisions:
        print(f"  step {d.step}: {d.policy} {d.action}: {d.reason}")


if __name__ == "__main__":
    main()
