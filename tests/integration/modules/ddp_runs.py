"""A tiny GRPO or PPO fit on the CPU in one process, under Lightning's DDP or FSDP2 (gloo); rank 0 writes the result.

Run by tests/integration/modules/test_ddp_equivalence.py as a script, with ``tests/`` on ``PYTHONPATH``
(Lightning's DDP launcher starts the other ranks by running this file again). Completions come from an
engine that seeds each prompt's sampling from the prompt and the step, so a prompt gets the same
completions whichever process (and batch) it lands in: what differs between the runs is only the rank
logic under test.

    PYTHONPATH=tests python tests/integration/modules/ddp_runs.py --method grpo --devices 2 --out r.pt
"""

from __future__ import annotations

import argparse
import hashlib
import os

import lightning as L
import torch
from helpers import high_ids
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_rl import GRPO, PPO, MemoryAwarePrecision, PromptDataModule
from lightning_rl.modules.sharding import is_fully_sharded
from lightning_rl.rollout import HFEngine, Rollout
from lightning_rl.rollout.hf import sharded_over_processes
from lightning_rl.rollout.padding import left_pad, right_pad
from lightning_rl.rollout.sharded_weights import fsdp2_parameters


class PerPromptSeededEngine(HFEngine):
    """transformers ``generate``, each prompt's completions drawn from a seed of (call number, prompt)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def generate(self, prompt_ids, sampling, num_generations=1):  # noqa: D102
        prompts, completions, logprobs, reasons = [], [], [], []
        for ids in prompt_ids:
            seed = int(hashlib.sha256(f"{self.calls}:{list(ids)}".encode()).hexdigest()[:8], 16)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                part = super().generate([ids], sampling, num_generations)
            for i in range(part.num_sequences):
                keep = part.completion_mask[i].bool()
                prompts.append(part.prompt_ids[i][part.prompt_mask[i].bool()].tolist())
                completions.append(part.completion_ids[i][keep].tolist())
                logprobs.append(part.sampling_logprobs[i][keep].tolist())
                reasons.append(part.finish_reasons[i])
        self.calls += 1
        prompt_t, prompt_mask = left_pad(prompts, self.pad_token_id)
        completion_t, completion_mask = right_pad(completions, self.pad_token_id)
        lp = torch.zeros(completion_t.shape)
        for i, row in enumerate(logprobs):
            lp[i, : len(row)] = torch.tensor(row)
        return Rollout(prompt_t, prompt_mask, completion_t, completion_mask, lp, reasons,
                       torch.arange(len(prompt_ids)).repeat_interleave(num_generations))


class Record(L.Callback):
    """The step's (all-process) loss and reward, as the module logged them."""

    def __init__(self):
        self.loss, self.reward, self.kl_coef, self.kl = [], [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        self.loss.append(float(trainer.callback_metrics["train/loss_step"]))
        self.reward.append(float(trainer.callback_metrics["train/reward_step"]))
        kl_ctl = getattr(pl_module, "kl_ctl", None)
        if kl_ctl is not None:
            self.kl_coef.append(float(kl_ctl.value))
            self.kl.append(float(trainer.callback_metrics["train/kl_step"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["grpo", "ppo"], default="grpo")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4, help="prompts per process and step")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp", help="with --devices > 1")
    ap.add_argument("--plugin", action="store_true", help="MemoryAwarePrecision with a 4 GiB budget")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--micro-batch-tokens", type=int, default=0,
                    help="a token budget per micro-batch (as the memory plan sets), with prompts of varied lengths")
    ap.add_argument("--first-process-micro-batch-tokens", type=int, default=0,
                    help="with --micro-batch-tokens: process 0's own budget (as two devices' plans can differ)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--export", default="", help="a folder: module.export there after the fit, on every process")
    ap.add_argument("--foreign-export-folder-on-rank1", action="store_true",
                    help="with --export: process 1's folder holds a user's README (as a node's own disk may)")
    ap.add_argument("--rank1-unscored", action="store_true",
                    help="the reward scores no completion of process 1 (None), and one unscored step is too many")
    ap.add_argument("--seed-per-process", type=int, default=None,
                    help="seed each process with this plus its rank, and sample with the module's own engine (the "
                         "global random state) instead of the per-prompt seeded one")
    ap.add_argument("--same-seed", action="store_true", help="with --seed-per-process: every process that seed")
    ap.add_argument("--ckpt-dir", default="", help="checkpoint every step there (last.ckpt)")
    ap.add_argument("--resume", action="store_true", help="resume from --ckpt-dir's last.ckpt")
    args = ap.parse_args()
    torch.set_num_threads(1)
    per_process = args.seed_per_process is not None
    # Lightning's DDP launcher starts the other processes with LOCAL_RANK set (one machine)
    rank = 0 if args.same_seed else int(os.environ.get("LOCAL_RANK", 0))
    L.seed_everything(args.seed_per_process + rank if per_process else 0, verbose=False)
    def high_ids_but_rank1(prompts, completions, completion_ids, **columns):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            return [None] * len(completions)
        return high_ids(prompts, completions, completion_ids)

    reward = high_ids_but_rank1 if args.rank1_unscored else high_ids
    common = dict(reward_funcs=[reward], model="tiny-llama", model_config={"num_hidden_layers": 1},
                  num_generations=4, sampling={"max_new_tokens": 6}, learning_rate=1e-2, chat_template=False,
                  logprob_backend="reference", max_prompt_length=16,
                  lora={"r": 4, "target_modules": ["q_proj", "v_proj"]} if args.lora else None,
                  max_unscored_steps=1 if args.rank1_unscored else 3)
    if args.method == "grpo":  # the global token count (dapo) and the batch std of the rewards cross processes
        module = GRPO(loss_type="dapo", scale_rewards="batch", **common)
    else:  # whitening, the token mean of the loss and the adaptive KL's sequence count cross processes
        module = PPO(num_iterations=1, kl_coef=0.05, kl_target=0.001, kl_horizon=32, **common)
    module.configure_model()
    if args.micro_batch_tokens:
        module.micro_batch_tokens = args.micro_batch_tokens
        if args.first_process_micro_batch_tokens and int(os.environ.get("LOCAL_RANK", 0)) == 0:
            module.micro_batch_tokens = args.first_process_micro_batch_tokens
    if not per_process:
        module.rollout_engine = PerPromptSeededEngine(lambda: module.policy, module.tokenizer.pad_token_id,
                                                      module.eos_token_ids)
    record = Record()
    callbacks: list[L.Callback] = [record]
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=1, save_last=True))
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=args.devices,
                        strategy=strategy_for(args.strategy, args.devices), logger=False,
                        enable_checkpointing=bool(args.ckpt_dir),
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=callbacks,
                        plugins=[MemoryAwarePrecision(memory_budget=4 * 2**30)] if args.plugin else None)
    rows = [{"prompt": f"say {i}"} for i in range(32)]
    if args.micro_batch_tokens:  # each process's padded length differs, and with it its micro-batches' rows
        rows = [{"prompt": "say " + "x" * (i % 7)} for i in range(32)]
    trainer.fit(module, PromptDataModule(train_data=rows, batch_size=args.batch_size),
                ckpt_path=os.path.join(args.ckpt_dir, "last.ckpt") if args.resume else None)
    plan = getattr(trainer.precision_plugin, "memory_plan", None)
    dtypes = sorted({str(p.dtype) for p in module.policy.parameters()})
    weights = {n: t.float().cpu().clone() for n, t in fsdp2_parameters(module.policy)}  # gathers: every rank
    export_error = None
    if args.export:  # collective under FSDP2: every process gathers, the first writes
        out = args.export
        if args.foreign_export_folder_on_rank1 and trainer.global_rank == 1:  # another node's disk, say
            out = f"{args.export}_rank1"
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "README.md"), "w") as fh:
                fh.write("# my project\n")
        try:
            module.export(out)
        except FileExistsError as err:
            if not args.foreign_export_folder_on_rank1:
                raise
            export_error = str(err)
    if trainer.is_global_zero:
        torch.save({"loss": record.loss, "reward": record.reward, "kl_coef": record.kl_coef, "kl": record.kl,
                    "weights": weights,
                    "sharded": is_fully_sharded(module.policy),
                    "reference_sharded": [is_fully_sharded(r) for r in module._frozen_reference],
                    "synced_generate": sharded_over_processes(module.policy), "dtypes": dtypes,
                    "micro_batch_tokens": module.micro_batch_tokens, "export_error": export_error,
                    "plan": None if plan is None else plan.to_dict()}, args.out)
    if torch.distributed.is_initialized():  # left to the interpreter's exit, gloo's threads once aborted it (-6)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def strategy_for(name: str, devices: int):
    """Lightning's DDP, or ``ModelParallelStrategy`` (the module shards itself with FSDP2), for ``devices``."""
    if devices == 1:
        return "auto"
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    return "ddp"


if __name__ == "__main__":
    main()
