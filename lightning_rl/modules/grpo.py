"""GRPO: group-relative policy optimization as a LightningModule (manual optimization)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from typing_extensions import override

from lightning_rl.algorithms.advantages import SCALE_REWARDS, ScaleRewards, group_advantages
from lightning_rl.algorithms.importance import IMPORTANCE_LEVELS, ImportanceLevel, importance_weights, mismatch_terms
from lightning_rl.algorithms.losses import (
    LOSS_TYPES,
    LossType,
    clipped_surrogate,
    kl_k3,
    masked_mean,
    token_weights,
)
from lightning_rl.algorithms.mini_batches import mini_batch_bounds
from lightning_rl.logprobs import Backend
from lightning_rl.models import EMBEDDED_DEFAULT
from lightning_rl.modules.config_checks import check_clip_range
from lightning_rl.modules.policy import PolicyModule
from lightning_rl.rewards.reward_set import RewardSet
from lightning_rl.rewards.validation import zero_std_fraction
from lightning_rl.rollout.engine import Rollout, SamplingConfig

_STEP_METRICS = (
    "reward", "reward_std", "advantage_abs", "kl", "entropy", "clip_ratio", "clip_ratio_low", "clip_ratio_high",
    "completion_length", "completion_length_max", "truncated_frac", "loss", "grad_norm",
    "rollout_time", "train_time", "tokens_per_sec", "importance_weight", "logprob_mismatch_mean",
    "logprob_mismatch_max", "frac_reward_zero_std",
)


class GRPO(PolicyModule):
    """Group Relative Policy Optimization.

    Each training step takes a batch of prompts, samples ``num_generations`` completions per
    prompt (from the rollout engine, or from a rollout a callback attached to the batch under
    ``"rollout"``), scores them with the reward functions, turns rewards into group-relative
    advantages, and minimizes the clipped surrogate (plus an optional KL to the reference).

    Args:
        reward_funcs: callables ``f(prompts, completions, **columns) -> list[float | None]``
            (import paths in YAML).
        reward_weights: weight of each reward function (default 1.0 each).
        num_generations: ``G``, completions per prompt (>= 2).
        max_new_tokens: generation limit per completion.
        temperature: sampling temperature (> 0), also applied to the trainer's log-probs.
        top_p: nucleus sampling threshold.
        top_k: top-k sampling (None disables).
        epsilon: lower clip range of the ratio.
        epsilon_high: upper clip range (DAPO clip-higher); defaults to ``epsilon``.
        beta: KL coefficient (k3 estimator) towards the reference; 0 disables the reference.
        loss_type: token aggregation: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo``.
        scale_rewards: advantage scaling: ``group``, ``batch`` or ``none``.
        num_iterations: policy updates per rollout (reuses it with stored old log-probs).
        num_mini_batches: optimizer steps per pass over the rollout, on near-equal shares of its
            ``batch * G`` completions (fewer when the batch has fewer completions).
        mask_truncated_completions: leave completions that hit ``max_new_tokens`` out of the loss.
        importance_sampling: correct for the rollout engine (e.g. vLLM) sampling from slightly other
            log-probs than the trainer's: ``none``, ``token`` or ``sequence`` truncated importance weights
            ``min(pi_old / pi_engine, cap)`` on the per-token loss; ``auto`` (default): ``token`` for
            rollouts of a separate engine (vLLM), ``none`` when the policy sampled them itself. The
            mismatch (mean and max ``|delta log-prob|``) is logged either way.
        importance_sampling_cap: upper bound of an importance weight.
        micro_batch_size: sequences per forward/backward (gradients accumulate over them). None (default):
            as many as the memory plan of :class:`~lightning_rl.plugins.MemoryAwarePrecision` allows, else
            what the free device memory holds (all of them on a CPU); see ``PolicyModule.micro_batch_for``.
        generation_batch_size: sequences per ``generate`` call of the default engine.
        val_max_new_tokens: generation limit for validation (greedy); defaults to ``max_new_tokens``.
        model: model source (see :func:`lightning_rl.models.load_policy`).
        model_config: config overrides for the tiny test models.
        dtype: weight dtype.
        lora: LoRA settings (mapping or ``LoraConfig``); None trains all weights.
        learning_rate: AdamW learning rate (when no ``optimizer``).
        weight_decay: AdamW weight decay (when no ``optimizer``).
        optimizer: optimizer callable.
        lr_scheduler: scheduler callable, stepped per optimizer step.
        max_grad_norm: gradient clipping norm (None or 0 disables).
        logprob_backend: ``auto``, ``triton`` or ``reference``.
        logprob_chunk_size: tokens per chunk of the reference log-prob path.
        system_prompt: optional system message.
        chat_template: render plain-text prompts with the chat template.
        max_prompt_length: prompt length limit in tokens.
        truncate_prompts: left-truncate long prompts instead of refusing them.
        gradient_checkpointing: recompute activations in the backward; None (default): on CUDA devices.
        max_nonfinite_steps: consecutive NaN/inf steps skipped before an error.
        max_unscored_steps: steps in a row where no completion got a reward before an error (0: never).
    """

    generates_rollouts = True

    def __init__(
        self,
        reward_funcs: Sequence[Callable[..., Any]],
        reward_weights: Sequence[float] | None = None,
        num_generations: int = 4,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        loss_type: LossType = "dapo",
        scale_rewards: ScaleRewards = "group",
        num_iterations: int = 1,
        num_mini_batches: int = 1,
        mask_truncated_completions: bool = False,
        importance_sampling: ImportanceLevel | Literal["auto"] = "auto",
        importance_sampling_cap: float = 2.0,
        micro_batch_size: int | None = None,
        generation_batch_size: int = 64,
        val_max_new_tokens: int | None = None,
        model: str = EMBEDDED_DEFAULT,
        model_config: dict[str, Any] | None = None,
        dtype: str = "float32",
        lora: dict[str, Any] | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
        logprob_backend: Backend = "auto",
        logprob_chunk_size: int = 1024,
        system_prompt: str | None = None,
        chat_template: bool = True,
        max_prompt_length: int | None = 512,
        truncate_prompts: bool = False,
        gradient_checkpointing: bool | None = None,
        max_nonfinite_steps: int = 3,
        max_unscored_steps: int = 3,
    ) -> None:
        super().__init__(
            model=model, model_config=model_config, dtype=dtype, lora=lora, learning_rate=learning_rate,
            weight_decay=weight_decay, optimizer=optimizer, lr_scheduler=lr_scheduler, max_grad_norm=max_grad_norm,
            logprob_backend=logprob_backend, logprob_chunk_size=logprob_chunk_size, system_prompt=system_prompt,
            chat_template=chat_template, max_prompt_length=max_prompt_length, truncate_prompts=truncate_prompts,
            gradient_checkpointing=gradient_checkpointing, max_nonfinite_steps=max_nonfinite_steps,
            max_unscored_steps=max_unscored_steps,
        )
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
        if num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2 (got {num_generations}): GRPO compares completions within a "
                "group, and a group of one has no baseline"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for training rollouts, got {temperature}")
        micro = 1 if micro_batch_size is None else micro_batch_size
        for name, v in (("num_iterations", num_iterations), ("num_mini_batches", num_mini_batches),
                        ("micro_batch_size", micro), ("generation_batch_size", generation_batch_size)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if epsilon <= 0 or (epsilon_high is not None and epsilon_high <= 0):
            raise ValueError(f"epsilon and epsilon_high must be > 0, got {epsilon} and {epsilon_high}")
        check_clip_range(epsilon, epsilon_high)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if importance_sampling not in (*IMPORTANCE_LEVELS, "auto"):
            raise ValueError(f"importance_sampling must be 'auto' or one of {IMPORTANCE_LEVELS}, "
                             f"got {importance_sampling!r}")
        if not importance_sampling_cap > 0:
            raise ValueError(f"importance_sampling_cap must be > 0, got {importance_sampling_cap}")
        self.save_hyperparameters()
        self.rewards = RewardSet(reward_funcs, reward_weights)
        self.num_generations = num_generations
        self.sampling = SamplingConfig(max_new_tokens, temperature, top_p, top_k)
        self.val_sampling = SamplingConfig(val_max_new_tokens or max_new_tokens, temperature=0.0)
        self.epsilon, self.epsilon_high, self.beta = epsilon, epsilon_high, beta
        self.loss_type, self.scale_rewards = loss_type, scale_rewards
        self.num_iterations, self.num_mini_batches = num_iterations, num_mini_batches
        self.mask_truncated_completions = mask_truncated_completions
        self.importance_sampling, self.importance_sampling_cap = importance_sampling, importance_sampling_cap
        self.micro_batch_size = micro_batch_size
        self.generation_batch_size = generation_batch_size
        per_fn = [f"reward/{n}" for n in self.rewards.names]
        self.make_metrics([*_STEP_METRICS, *per_fn], ["reward", *per_fn])

    @property
    @override
    def needs_reference_model(self) -> bool:
        return self.beta > 0

    # ----------------------------------------------------------------------------- training
    @torch.no_grad()
    def _logprobs_no_grad(self, model: nn.Module, rollout: Rollout, micro: int) -> torch.Tensor:
        out = []
        for start in range(0, rollout.num_sequences, micro):
            lp, _ = self.sequence_logprobs(model, rollout, slice(start, start + micro), self.sampling.temperature)
            out.append(lp)
        return torch.cat(out)

    def _global_tokens(self, mask: torch.Tensor) -> float:
        count = mask.sum().detach()
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        return float(count)

    def importance_level(self, rollout: Rollout) -> ImportanceLevel:
        """The importance-sampling level for ``rollout``: ``importance_sampling``, resolving ``auto``."""
        if self.importance_sampling != "auto":
            return self.importance_sampling
        return "token" if rollout.extras.get("engine") not in (None, "hf") else "none"

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One rollout, then ``num_iterations * num_mini_batches`` optimizer steps on it.

        Step statistics stay on the device as tensors and are read back once, at the end of the step.
        """
        prompts = batch["prompt"]
        t0 = time.perf_counter()
        rollout = batch.get("rollout")
        rollout = self.generate_rollout(prompts) if rollout is None else rollout.to(self.device)
        rollout_time = time.perf_counter() - t0
        g = self.num_generations
        n = rollout.num_sequences
        if n != len(prompts) * g:
            raise ValueError(f"the rollout has {n} completions for {len(prompts)} prompts; expected {g} each")
        bounds = mini_batch_bounds(n, self.num_mini_batches)
        micro = self.micro_batch_for(max(hi - lo for lo, hi in bounds), rollout.sequence_length)
        is_level = self.importance_level(rollout)
        total, per_fn, completions = self.score(prompts, rollout, self.columns_of(batch), g)
        advantages = group_advantages(total, g, self.scale_rewards).to(self.device)
        self.record_rollout_samples(prompts, completions, total, per_fn, g, advantage=advantages)
        mask = rollout.completion_mask.float()
        truncated = rollout.truncated.to(self.device)
        if self.mask_truncated_completions:
            mask = mask * (~truncated).float()[:, None]

        t1 = time.perf_counter()
        off_policy = self.num_iterations > 1 or self.num_mini_batches > 1
        old_logp = self._logprobs_no_grad(self.policy, rollout, micro) if off_policy else None
        ref_logp = None
        if self.beta > 0:
            with self.reference_model() as ref:
                ref_logp = self._logprobs_no_grad(ref, rollout, micro)

        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        world = self.trainer.world_size if self._trainer is not None else 1
        for it in range(self.num_iterations):
            for lo, hi in bounds:
                rows = slice(lo, hi)
                weights = token_weights(
                    mask[rows], self.loss_type, self.sampling.max_new_tokens, micro, world,
                    self._global_tokens(mask[rows]) if self.loss_type == "dapo" else None,
                )
                step_loss = torch.zeros((), device=self.device)
                for s in range(rows.start, rows.stop, micro):
                    mb = slice(s, min(s + micro, rows.stop))
                    w = weights[mb.start - rows.start : mb.stop - rows.start]
                    logp, ent = self.sequence_logprobs(self.policy, rollout, mb, self.sampling.temperature)
                    old = logp.detach() if old_logp is None else old_logp[mb]
                    terms = clipped_surrogate(logp, old, advantages[mb], self.epsilon, self.epsilon_high)
                    per_token = terms.loss
                    mmask = mask[mb]
                    if it == 0:
                        delta, cmask = mismatch_terms(old, rollout.sampling_logprobs[mb], rollout.completion_mask[mb])
                        stats["mismatch_sum"].append((delta * cmask).sum())
                        stats["mismatch_count"].append(cmask.sum())
                        stats["logprob_mismatch_max"].append((delta * cmask).max())
                    if is_level != "none":
                        isw = importance_weights(old, rollout.sampling_logprobs[mb], mmask, is_level,
                                                 self.importance_sampling_cap)
                        per_token = per_token * isw
                        stats["importance_weight"].append(masked_mean(isw, mmask))
                    if ref_logp is not None:
                        kl = kl_k3(logp, ref_logp[mb])
                        per_token = per_token + self.beta * kl
                        stats["kl"].append(masked_mean(kl.detach(), mmask))
                    loss = (per_token * w).sum()
                    self.manual_backward(loss)
                    step_loss = step_loss + loss.detach()
                    stats["entropy"].append(masked_mean(ent.detach(), mmask))
                    low, high = terms.clipped_low.float(), terms.clipped_high.float()
                    stats["clip_ratio_low"].append(masked_mean(low, mmask))
                    stats["clip_ratio_high"].append(masked_mean(high, mmask))
                    stats["clip_ratio"].append(masked_mean(low + high, mmask))
                result = self.optimizer_step_checked(step_loss)
                stats["loss"].append(step_loss)
                stats["grad_norm"].append(torch.tensor(result["grad_norm"]))
        train_time = time.perf_counter() - t1

        lengths = rollout.completion_mask.sum(-1).float()
        finite = total[~torch.isnan(total)]
        device_values = {k: torch.stack([v.float().to(self.device) for v in vs]).mean()
                         for k, vs in stats.items() if vs and k not in ("mismatch_sum", "mismatch_count",
                                                                       "logprob_mismatch_max")}
        if stats["mismatch_count"]:
            count = torch.stack(stats["mismatch_count"]).sum()
            device_values["logprob_mismatch_mean"] = torch.stack(stats["mismatch_sum"]).sum() / count.clamp(min=1)
            device_values["logprob_mismatch_max"] = torch.stack(stats["logprob_mismatch_max"]).max()
        device_values.update(
            advantage_abs=advantages.abs().mean(),
            completion_length=lengths.mean(),
            completion_length_max=lengths.max(),
            truncated_frac=truncated.float().mean(),
        )
        values = dict(zip(device_values, torch.stack(list(device_values.values())).tolist()))  # one sync
        tokens = float(lengths.sum())
        values.update(
            reward=finite.mean().item() if finite.numel() else float("nan"),
            reward_std=finite.std().item() if finite.numel() > 1 else 0.0,
            frac_reward_zero_std=zero_std_fraction(total, g),
            rollout_time=rollout_time,
            train_time=train_time,
            tokens_per_sec=tokens / max(rollout_time, 1e-9),
        )
        for j, name in enumerate(self.rewards.names):
            col = per_fn[:, j]
            col = col[~torch.isnan(col)]
            if col.numel():
                values[f"reward/{name}"] = col.mean().item()
        self.check_health(total, per_fn, values)
        self.log_values("train", values, len(prompts), prog_bar=("reward", "kl"))

    # ----------------------------------------------------------------------------- evaluation
    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Greedy completions for held-out prompts; logs the mean reward (overall and per function)."""
        self.log_greedy_rewards(batch)

    @torch.no_grad()
    def evaluate(self, rows: Sequence[Mapping[str, Any]], batch_size: int = 64) -> dict[str, Any]:
        """Greedy completions and rewards on ``rows`` outside a Trainer (e.g. before and after training).

        Returns:
            ``{"reward": mean total reward, "reward/<fn>": ..., "completions": [...]}``.
        """
        self.configure_model()
        totals, per, texts = [], [], []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            prompts = [r["prompt"] for r in chunk]
            columns = {k: [r.get(k) for r in chunk] for k in chunk[0] if k != "prompt"}
            rollout = self.generate_rollout(prompts, sampling=self.val_sampling, num_generations=1)
            total, per_fn, completions = self.score(prompts, rollout, columns, 1)
            totals.append(total)
            per.append(per_fn)
            texts.extend(completions)
        total, per_fn = torch.cat(totals), torch.cat(per)
        out: dict[str, Any] = {"reward": torch.nanmean(total).item(), "completions": texts}
        for j, name in enumerate(self.rewards.names):
            out[f"reward/{name}"] = torch.nanmean(per_fn[:, j]).item()
        return out

