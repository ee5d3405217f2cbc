"""A Hugging Face ``Trainer`` run with lrctl owning the learning rate.

A tiny GPT-2 built from a config object (no download) learns characters of
Python's standard library source. The only lrctl line is the callback; it
takes over the Trainer's scheduler, so the ``learning_rate`` the Trainer logs
is the LR lrctl chose, and it observes the loss and grad norm the Trainer has
already computed.

    python examples/train_hf.py --steps 200
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
    args = parser.parse_args()

    torch.manual_seed(0)
    train, vocab = char_dataset(context=64, max_chars=200_000)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    lrctl_callback = LrctlCallback(policy=args.policy, run_name="train-hf")  # ← lrctl
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=16,
        learning_rate=args.lr, logging_steps=1,  # lrctl observes what the Trainer logs
        max_grad_norm=1.0, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, log_level="warning", seed=0)
    trainer = Trainer(model=model, args=training_args, train_dataset=train,
                      callbacks=[lrctl_callback])
    trainer.train()

    ctl = lrctl_callback.controller
    assert ctl is not None
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    print(f"the Trainer logged learning_rate {logged[0]:.3g} at step 1 … {logged[-1]:.3g} at "
          f"step {len(logged)}: lrctl's LRs, not its own scheduler's")
    print(f"lrctl run {ctl.run_key}: {ctl.steps_taken} steps, final lr {ctl.lr[0]:.3g}")
    for d in ctl.decisions:
        print(f"  step {d.step}: {d.policy} {d.action}: {d.reason}")


if __name__ == "__main__":
    main()
