"""The main job: GRPO with LoRA on SmolLM2-135M-Instruct, learning single-digit addition.

Measures greedy accuracy on held-out problems before and after a short GRPO run and prints
both. Runs on the CPU when there is no GPU (the README gives the measured time and accuracy)::

    python -m lightning_rl.demo
"""

from __future__ import annotations

import argparse
import json
import time

import lightning as L
import torch

from lightning_rl.data.arithmetic import ArithmeticDataModule
from lightning_rl.modules.grpo import GRPO
from lightning_rl.rewards import NumericMatch
from lightning_rl.rollout import SamplingConfig


class StepPrinter(L.Callback):
    """Print one line per training step (reward, completion length, time), also without a TTY."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        m = trainer.callback_metrics
        get = lambda k: float(m[k]) if k in m else float("nan")  # noqa: E731
        print(
            f"[demo] step {trainer.global_step:3d}  reward {get('train/reward_step'):.3f}  "
            f"length {get('train/completion_length_step'):.1f}  {time.perf_counter() - self.start:6.0f} s",
            flush=True,
        )


def build(args: argparse.Namespace) -> tuple[GRPO, ArithmeticDataModule]:
    """The GRPO module and the arithmetic data of the demo."""
    data = ArithmeticDataModule(
        num_train=args.num_train, num_val=args.num_val, max_operand=args.max_operand, seed=args.seed,
        batch_size=args.prompts_per_step,
    )
    module = GRPO(
        # correct when the last number the reply writes is the sum ("4 + 8 = 12" counts)
        reward_funcs=[NumericMatch(column="answer", position=args.answer_position)],
        model=args.model,
        lora={"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        num_generations=args.num_generations,
        sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0),
        learning_rate=args.learning_rate,
        loss_type="dapo",
        micro_batch_size=args.num_generations * args.prompts_per_step,
        dtype="bfloat16" if torch.cuda.is_available() else "float32",
    )
    return module, data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--answer-position", choices=("first", "last"), default="last",
                   help="which number of the reply is read as the answer")
    p.add_argument("--max-operand", type=int, default=9)
    p.add_argument("--num-train", type=int, default=70)
    p.add_argument("--num-val", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the demo and print held-out accuracy before and after training."""
    args = parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    module, data = build(args)
    module.configure_model()
    data.setup("fit")
    held_out = data.val_rows
    before = module.evaluate(held_out)
    acc_before = before["reward/numeric_match"]
    print(f"[demo] held-out accuracy before GRPO: {acc_before:.1%} ({len(held_out)} problems, greedy)")
    print(f"[demo] e.g. {held_out[0]['question']!r} -> {before['completions'][0]!r}")

    trainer = L.Trainer(
        max_steps=args.steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1, enable_model_summary=False,
        enable_progress_bar=False, callbacks=[StepPrinter()],
    )
    t_train = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_time = time.perf_counter() - t_train

    after = module.evaluate(held_out)
    acc_after = after["reward/numeric_match"]
    print(f"[demo] held-out accuracy before GRPO: {acc_before:.1%}")
    print(f"[demo] held-out accuracy after  GRPO: {acc_after:.1%}  ({args.steps} steps, {train_time:.0f} s)")
    print(f"[demo] e.g. {held_out[0]['question']!r} -> {after['completions'][0]!r}")
    result = {
        "accuracy_before": acc_before, "accuracy_after": acc_after, "steps": args.steps,
        "train_seconds": round(train_time, 1), "total_seconds": round(time.perf_counter() - t0, 1),
        "seed": args.seed, "device": str(module.device), "config": vars(args),
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
