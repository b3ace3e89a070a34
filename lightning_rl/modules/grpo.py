"""GRPO: group-relative policy optimization as a LightningModule (manual optimization)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from typing_extensions import override

from lightning_rl.algorithms.advantages import SCALE_REWARDS, ScaleRewards, group_advantages
from lightning_rl.algorithms.importance import IMPORTANCE_LEVELS, ImportanceLevel, importance_weights, mismatch_terms
from lightning_rl.algorithms.losses import LOSS_TYPES, LossType, clipped_surrogate, kl_k3, token_weights
from lightning_rl.modules.experience import Experience, PolicyOutput, Rows
from lightning_rl.modules.on_policy import OnPolicyModule
from lightning_rl.rewards.validation import zero_std_fraction
from lightning_rl.rollout.engine import Rollout


class GRPO(OnPolicyModule):
    """Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, Section 4.1).

    Each step samples a group of ``num_generations`` completions per prompt and scores them; a
    completion's advantage is its reward minus its group's mean, divided by the group's std (the
    outcome supervision of Section 4.1.2; ``scale_rewards``); the loss is the clipped surrogate of
    eq. 3, token by token, plus ``beta`` times the k3 estimate of the KL to the reference (eq. 4).
    ``loss_type`` picks how token losses are averaged: ``grpo`` as in eq. 3 (per completion, then
    over the group), ``dapo`` over all the step's tokens (Yu et al. 2025, DAPO, arXiv:2503.14476,
    Section 3.3, with clip-higher from Section 3.1 as ``epsilon_high``), ``dr_grpo`` a sum over tokens
    divided by a constant (Liu et al. 2025, Dr. GRPO, arXiv:2503.20783, which also drops the std:
    ``scale_rewards="none"``), ``bnpo`` per micro-batch. The steps and the methods to override are
    those of :class:`~lightning_rl.modules.on_policy.OnPolicyModule`.

    Args:
        reward_funcs: callables ``f(prompts, completions, **columns) -> list[float | None]`` (import paths
            in YAML); a :class:`~lightning_rl.rewards.RewardModel` is one too.
        num_generations: ``G``, completions per prompt (>= 2: a group of one has no baseline).
        num_iterations: policy updates per rollout (``mu`` in the paper's Algorithm 1); with more than one,
            or ``num_mini_batches > 1``, the rollout's log-probs are kept from before the first update.
        beta: KL coefficient (k3 estimator) towards the reference; 0 disables the reference.
        loss_type: token aggregation: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo``.
        scale_rewards: advantage scaling: ``group``, ``batch`` or ``none``.
        mask_truncated_completions: leave completions that hit ``max_new_tokens`` out of the loss.
        importance_sampling: correct for the rollout engine (e.g. vLLM) sampling from slightly other
            log-probs than the trainer's: ``none``, ``token`` or ``sequence`` truncated importance weights
            ``min(pi_old / pi_engine, cap)`` on the per-token loss; ``auto`` (default): ``token`` for
            rollouts of a separate engine (vLLM) or of older weights (generated during the last update), ``none``
            when the policy sampled them itself with its current weights. The
            mismatch (mean and max ``|delta log-prob|``) is logged either way.
        importance_sampling_cap: upper bound of an importance weight.
        **kwargs: the :class:`~lightning_rl.modules.on_policy.OnPolicyModule` arguments (``sampling``,
            ``epsilon``, ``epsilon_high``, ``num_mini_batches``, ``micro_batch_size``, ...) and the
            :class:`~lightning_rl.modules.policy.PolicyModule` ones (``model``, ``lora``, ``learning_rate``, ...).
    """

    step_metrics = ("advantage_abs", "kl", "importance_weight", "logprob_mismatch_mean", "logprob_mismatch_max",
                    "frac_reward_zero_std")

    def __init__(
        self,
        reward_funcs: Sequence[Callable[..., Any]],
        num_generations: int = 4,
        num_iterations: int = 1,
        beta: float = 0.0,
        loss_type: LossType = "dapo",
        scale_rewards: ScaleRewards = "group",
        mask_truncated_completions: bool = False,
        importance_sampling: ImportanceLevel | Literal["auto"] = "auto",
        importance_sampling_cap: float = 2.0,
        **kwargs: Any,
    ) -> None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
        if num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2 (got {num_generations}): GRPO compares completions within a "
                "group, and a group of one has no baseline"
            )
        if not math.isfinite(beta) or beta < 0:
            raise ValueError(f"beta must be a finite number >= 0 (0 turns the KL term off), got {beta}")
        if importance_sampling not in (*IMPORTANCE_LEVELS, "auto"):
            raise ValueError(f"importance_sampling must be 'auto' or one of {IMPORTANCE_LEVELS}, "
                             f"got {importance_sampling!r}")
        if not importance_sampling_cap > 0:
            raise ValueError(f"importance_sampling_cap must be > 0, got {importance_sampling_cap}")
        super().__init__(reward_funcs=reward_funcs, num_generations=num_generations, num_iterations=num_iterations,
                         **kwargs)
        self.beta, self.loss_type, self.scale_rewards = beta, loss_type, scale_rewards
        self.mask_truncated_completions = mask_truncated_completions
        self.importance_sampling, self.importance_sampling_cap = importance_sampling, importance_sampling_cap

    @property
    @override
    def needs_reference_model(self) -> bool:
        return self.beta > 0

    def importance_level(self, rollout: Rollout) -> ImportanceLevel:
        """The importance-sampling level for ``rollout``: ``importance_sampling``, resolving ``auto``.

        ``auto`` corrects with token-level weights a rollout sampled by another engine than the policy's own
        forward (vLLM's kernels) or from older weights (``extras["staleness"] > 0``: generated during the last
        update), and nothing otherwise.
        """
        if self.importance_sampling != "auto":
            return self.importance_sampling
        other_engine = rollout.extras.get("engine") not in (None, "hf")
        return "token" if other_engine or rollout.extras.get("staleness", 0) > 0 else "none"

    # ----------------------------------------------------------------------------- the paper's steps
    @override
    def loss_mask(self, rollout: Rollout, rewards: torch.Tensor) -> torch.Tensor:
        """Completion tokens; without the truncated completions when ``mask_truncated_completions``."""
        mask = rollout.completion_mask.float()
        if self.mask_truncated_completions:
            mask = mask * (~rollout.truncated.to(self.device)).float()[:, None]
        return mask

    @override
    def prepare(self, exp: Experience) -> None:
        """Old log-probs when the rollout serves more than one update; reference log-probs when ``beta > 0``."""
        if self.num_iterations > 1 or self.num_mini_batches > 1:
            exp.old_logp = self.no_grad_logprobs(self.policy, exp)
        if self.beta > 0:
            with self.reference_model() as ref:
                exp.ref_logp = self.no_grad_logprobs(ref, exp)

    @override
    def compute_advantages(self, exp: Experience) -> torch.Tensor:
        """``[N]`` group-relative advantages: reward minus the group mean, scaled per ``scale_rewards``."""
        reduce = self.sum_over_processes() if self.scale_rewards == "batch" else None
        return group_advantages(exp.rewards.to(self.device), self.num_generations, self.scale_rewards, reduce=reduce)

    @override
    def loss_weights(self, exp: Experience, rows: Rows) -> torch.Tensor:
        """The mini-batch's token weights for ``loss_type`` (:func:`~lightning_rl.algorithms.losses.token_weights`)."""
        mask = exp.mask[rows]
        world = self.trainer.world_size if self._trainer is not None else 1
        global_tokens = None
        if self.loss_type == "dapo":
            count, reduce = mask.sum().detach().float(), self.sum_over_processes()
            global_tokens = reduce(count) if reduce is not None else count  # a device tensor: no host read
        return token_weights(mask, self.loss_type, self.sampling.max_new_tokens, exp.micro_batch_size, world,
                             global_tokens)

    @override
    def policy_loss(self, exp: Experience, rows: Rows, out: PolicyOutput) -> torch.Tensor:
        """Per-token clipped surrogate (eq. 3), importance-weighted against the engine, plus ``beta`` * k3 KL."""
        mask, rollout = exp.mask[rows], exp.rollout
        old = out.logp.detach() if exp.old_logp is None else exp.old_logp[rows]
        terms = clipped_surrogate(out.logp, old, exp.advantages[rows], self.epsilon, self.epsilon_high)
        per_token = terms.loss
        if exp.iteration == 0:
            delta, cmask = mismatch_terms(old, rollout.sampling_logprobs[rows], rollout.completion_mask[rows])
            exp.stats.add_ratio("logprob_mismatch_mean", (delta * cmask).sum(), cmask.sum())
            exp.stats.add_max("logprob_mismatch_max", (delta * cmask).max())
        level = self.importance_level(rollout)
        if level != "none":
            isw = importance_weights(old, rollout.sampling_logprobs[rows], mask, level, self.importance_sampling_cap)
            per_token = per_token * isw
            exp.stats.add_token_mean("importance_weight", isw.detach(), mask)
        if exp.ref_logp is not None:
            kl = kl_k3(out.logp, exp.ref_logp[rows])
            per_token = per_token + self.beta * kl
            exp.stats.add_token_mean("kl", kl.detach(), mask)
        self.record_clipping(exp, terms, mask)
        return per_token

    # ----------------------------------------------------------------------------- metrics
    @override
    def step_statistics(self, exp: Experience) -> None:
        exp.stats.set("advantage_abs", exp.advantages.abs().mean())

    @override
    def reward_statistics(self, exp: Experience) -> dict[str, float]:
        """The shared reward statistics, and the share of groups whose rewards are all equal (no signal)."""
        return {**super().reward_statistics(exp),
                "frac_reward_zero_std": zero_std_fraction(exp.rewards, self.num_generations)}


