"""PPO with a value head, KL-shaped rewards and GAE, as a LightningModule (manual optimization)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_rl.algorithms.gae import check_discount, explained_variance, gae, masked_std, whiten
from lightning_rl.algorithms.losses import clipped_surrogate, masked_mean
from lightning_rl.algorithms.ppo_losses import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    KLEstimator,
    approx_kl,
    clipped_value_loss,
    kl_penalty,
    token_rewards,
)
from lightning_rl.lora import apply_lora
from lightning_rl.models import load_policy
from lightning_rl.modules.experience import Experience, PolicyOutput, Rows
from lightning_rl.modules.on_policy import OnPolicyModule
from lightning_rl.modules.value_head import ValueHead, hidden_size_of, logprobs_from_hidden
from lightning_rl.rewards.reward_model import RewardModel, same_tokenizer
from lightning_rl.rewards.reward_set import as_reward_list
from lightning_rl.rollout.engine import Rollout


class PPO(OnPolicyModule):
    """Proximal Policy Optimization with a learned value function, the RLHF recipe of Ziegler et al. 2019.

    Each step samples ``num_generations`` completions per prompt and scores each whole completion
    with the reward functions and/or the reward model; that score goes on the last token, and a
    per-token KL penalty to the reference on every token (the adaptive coefficient of Ziegler et al.
    2019 when ``kl_target`` is set). Advantages come from generalized advantage estimation
    (Schulman et al. 2016, arXiv:1506.02438, Section 3) on the values of the rollout, whitened. Then
    ``num_iterations`` passes over the rollout minimize the clipped surrogate (Schulman et al. 2017,
    arXiv:1707.06347, eq. 7) plus ``vf_coef`` times the value loss minus ``ent_coef`` times the
    entropy (eq. 9); the value loss is clipped around the rollout's values as in OpenAI's baselines
    (``cliprange_value``; not in the paper). The steps and the methods to override are those of
    :class:`~lightning_rl.modules.on_policy.OnPolicyModule`; ``epsilon`` / ``epsilon_high`` clip the ratio.

    Args:
        reward_funcs: callables ``f(prompts, completions, **columns) -> list[float | None]``.
        reward_weights: weight of each reward function, then of the reward model (default 1.0 each).
        reward_model: a :class:`~lightning_rl.rewards.RewardModel` scored like one more reward function.
        num_generations: completions sampled per prompt.
        num_iterations: passes over each rollout (PPO's epochs), each in ``num_mini_batches`` shuffled
            mini-batches.
        cliprange_value: clip range of the value update around the rollout's values (None: no clipping).
        vf_coef: weight of the value loss.
        ent_coef: weight of the entropy bonus (subtracted from the loss).
        kl_coef: KL penalty coefficient in the rewards (0 with no ``kl_target`` disables the reference).
        kl_estimator: per-token KL estimate in the rewards: ``k1`` or ``k3``.
        kl_target: target KL per sequence for the adaptive coefficient; None keeps ``kl_coef`` fixed.
        kl_horizon: sequences over which the adaptive coefficient moves.
        gamma: discount in ``[0, 1]``.
        lam: GAE lambda in ``[0, 1]``.
        whiten_advantages: scale advantages to zero mean and unit variance over the rollout's tokens.
        critic_model: a separate critic (model source as for ``model``; same tokenizer as the policy);
            None puts the value head on the policy's backbone.
        critic_model_config: config overrides for a tiny critic model.
        value_learning_rate: learning rate of the value head and critic (default: the policy's, i.e.
            ``learning_rate`` or the given optimizer's).
        value_head_dropout: dropout before the value head's Linear.
        **kwargs: the :class:`~lightning_rl.modules.on_policy.OnPolicyModule` arguments (``sampling``,
            ``epsilon``, ``num_mini_batches``, ``micro_batch_size``, ...) and the
            :class:`~lightning_rl.modules.policy.PolicyModule` ones (``model``, ``lora`` (the adapters and
            the value head train, the base stays frozen), ``learning_rate``, ...).
    """

    step_metrics = ("kl", "kl_coef", "non_score_reward", "policy_loss", "value_loss", "value_clip_ratio",
                    "approx_kl", "explained_variance", "value_mean", "return_mean", "advantage_std")
    progress_bar_metrics = ("reward", "kl", "value_loss")
    hparams_ignore = ("reward_model",)  # a model, not plain data: pass it again to load_from_checkpoint

    def __init__(
        self,
        reward_funcs: Sequence[Callable[..., Any]] | None = None,
        reward_weights: Sequence[float] | None = None,
        reward_model: RewardModel | None = None,
        num_generations: int = 1,
        num_iterations: int = 4,
        cliprange_value: float | None = 0.2,
        vf_coef: float = 0.1,
        ent_coef: float = 0.0,
        kl_coef: float = 0.05,
        kl_estimator: KLEstimator = "k1",
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        critic_model: str | None = None,
        critic_model_config: dict[str, Any] | None = None,
        value_learning_rate: float | None = None,
        value_head_dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        gamma, lam = check_discount("gamma", gamma), check_discount("lam", lam)
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
        if cliprange_value is not None and cliprange_value <= 0:
            raise ValueError(f"cliprange_value must be > 0 (None: no value clipping), got {cliprange_value}")
        if vf_coef < 0 or ent_coef < 0:
            raise ValueError(f"vf_coef and ent_coef must be >= 0, got {vf_coef} and {ent_coef}")
        if value_learning_rate is not None and value_learning_rate <= 0:
            raise ValueError(f"value_learning_rate must be > 0, got {value_learning_rate}")
        funcs = [*as_reward_list(reward_funcs), *([reward_model] if reward_model is not None else [])]
        if not funcs:
            raise ValueError("PPO needs a reward: give reward_funcs=[...], reward_model=RewardModel(...), or both")
        kl_ctl = AdaptiveKLController(kl_coef, kl_target, kl_horizon)
        super().__init__(reward_funcs=funcs, reward_weights=reward_weights, num_generations=num_generations,
                         num_iterations=num_iterations, **kwargs)
        self.kl_ctl, self.kl_estimator = kl_ctl, kl_estimator
        self.gamma, self.lam, self.whiten_advantages = gamma, lam, whiten_advantages
        self.cliprange_value, self.vf_coef, self.ent_coef = cliprange_value, vf_coef, ent_coef
        self.critic_model, self.critic_model_config = critic_model, critic_model_config
        self.value_learning_rate, self.value_head_dropout = value_learning_rate, value_head_dropout
        self.value_head: ValueHead | None = None
        self.critic: nn.Module | None = None

    @property
    @override
    def needs_reference_model(self) -> bool:
        return self.kl_ctl.value > 0 or self.kl_ctl.adaptive

    # ----------------------------------------------------------------------------- model
    @override
    def configure_model(self) -> None:
        """Load the policy (base class), then the critic if separate, and the value head."""
        super().configure_model()
        if self.value_head is not None:
            return
        if self.critic_model is not None:
            critic, tok = load_policy(self.critic_model, self.critic_model_config, self.dtype_name)
            self.drop_dropout(critic)
            if not same_tokenizer(tok, self.tokenizer):
                raise ValueError(
                    f"the critic {self.critic_model!r} uses another tokenizer than the policy {self.model_source!r}; "
                    "a critic reads the policy's token ids, so pick one of the same model family or leave "
                    "critic_model=None to put the value head on the policy's backbone"
                )
            self.critic = apply_lora(critic, self.lora)
            self.apply_gradient_checkpointing()
            self.apply_compile_layers()
            self.apply_tile_mlps()
        self.value_head = ValueHead(hidden_size_of(self.critic or self.policy), self.value_head_dropout)
        self.apply_sharding()

    @override
    def checkpointed_models(self) -> list[nn.Module]:
        return [m for m in (self.policy, self.critic) if m is not None]

    @override
    def other_trained_modules(self) -> list[nn.Module]:
        return [self.value_head] if self.value_head is not None else []

    def value_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the value head and the critic."""
        mods = [m for m in (self.value_head, self.critic) if m is not None]
        return [p for m in mods for p in m.parameters() if p.requires_grad]

    @override
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Two groups: the policy's parameters, and the value head's and critic's at ``value_learning_rate``."""
        value = self.value_parameters()
        ids = {id(p) for p in value}
        policy = [p for p in self.trainable_parameters() if id(p) not in ids]
        if not policy:
            raise ValueError("the policy has no trainable parameters; check the lora settings")
        value_group: dict[str, Any] = {"params": value}
        if self.value_learning_rate is not None:
            value_group["lr"] = self.value_learning_rate
        return [{"params": policy}, value_group]

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the (possibly adapted) KL coefficient."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo_kl_controller"] = self.kl_ctl.state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Build the model, then restore the KL coefficient."""
        super().on_load_checkpoint(checkpoint)
        if "ppo_kl_controller" in checkpoint:
            self.kl_ctl.load_state_dict(checkpoint["ppo_kl_controller"])

    # ----------------------------------------------------------------------------- the recipe's steps
    @override
    def loss_mask(self, rollout: Rollout, rewards: torch.Tensor) -> torch.Tensor:
        """Completion tokens of the completions that got a reward (the others stay out of the loss)."""
        scored = (~torch.isnan(rewards)).to(self.device)
        return rollout.completion_mask.float() * scored.float()[:, None]

    @override
    def policy_forward(self, exp: Experience, rows: Rows) -> PolicyOutput:
        """Log-probs, entropy and values of ``rows``: one backbone forward when the value head shares it."""
        r = exp.rollout
        args = (r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows], r.completion_mask[rows])
        temp = self.sampling.temperature
        if self.critic is None:
            hidden = self.completion_hidden(self.policy, *args)
            logp, ent = logprobs_from_hidden(self.policy, hidden, args[2], args[3], temp, self.logprob_backend,
                                             self.logprob_chunk_size)
        else:
            logp, ent = self.sequence_logprobs(self.policy, r, rows, temp)
            hidden = self.completion_hidden(self.critic, *args)
        return PolicyOutput(logp, ent, self.value_head(hidden) * args[3].float())

    @override
    @torch.no_grad()
    def prepare(self, exp: Experience) -> None:
        """The rollout's log-probs and values before the update, and (with a KL penalty) reference log-probs."""
        micro = exp.micro_batch_size
        outs = [self.policy_forward(exp, slice(s, s + micro)) for s in range(0, exp.num_completions, micro)]
        exp.old_logp, exp.values = torch.cat([o.logp for o in outs]), torch.cat([o.values for o in outs])
        if self.needs_reference_model:
            with self.reference_model() as ref:
                exp.ref_logp = self.no_grad_logprobs(ref, exp)

    @override
    def compute_advantages(self, exp: Experience) -> torch.Tensor:
        """``[N, C]`` GAE advantages of the KL-shaped token rewards, whitened; sets ``exp.kl`` and ``exp.returns``."""
        mask = exp.mask
        exp.kl = torch.zeros_like(exp.old_logp) if exp.ref_logp is None else \
            kl_penalty(exp.old_logp, exp.ref_logp, self.kl_estimator) * mask
        rewards = token_rewards(torch.nan_to_num(exp.rewards.to(self.device)), exp.kl, mask, self.kl_ctl.value)
        advantages, exp.returns = gae(rewards, exp.values, mask, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = whiten(advantages, mask, reduce=self.sum_over_processes())
        return advantages

    @override
    def mini_batch_order(self, n: int) -> torch.Tensor:
        """A new random order of the completions for every pass."""
        return torch.randperm(n).to(self.device)

    @override
    def loss_weights(self, exp: Experience, rows: Rows) -> torch.Tensor:
        """The mini-batch's token mean: each counted token weighs ``1 / tokens``.

        Under DDP/FSDP the tokens are counted over every process and the weights scaled by their number,
        so the averaged gradients are those of the token mean over the whole (global) mini-batch.
        """
        mask = exp.mask[rows]
        reduce = self.sum_over_processes()
        if reduce is None:
            return mask / mask.sum().clamp(min=1)
        return mask * self.trainer.world_size / reduce(mask.sum().detach()).clamp(min=1)

    @override
    def policy_loss(self, exp: Experience, rows: Rows, out: PolicyOutput) -> torch.Tensor:
        """Per-token clipped surrogate + ``vf_coef`` * clipped value loss - ``ent_coef`` * entropy (eq. 9)."""
        mask, old_logp = exp.mask[rows], exp.old_logp[rows]
        pg = clipped_surrogate(out.logp, old_logp, exp.advantages[rows], self.epsilon, self.epsilon_high)
        vf = clipped_value_loss(out.values, exp.values[rows], exp.returns[rows], self.cliprange_value)
        exp.stats.add_token_mean("policy_loss", pg.loss.detach(), mask)
        exp.stats.add_token_mean("value_loss", vf.loss.detach(), mask)
        self.record_clipping(exp, pg, mask)
        exp.stats.add_token_mean("value_clip_ratio", vf.clipped.float(), mask)
        exp.stats.add_token_mean("approx_kl", approx_kl(out.logp.detach(), old_logp), mask)
        return pg.loss + self.vf_coef * vf.loss - self.ent_coef * out.entropy

    # ----------------------------------------------------------------------------- metrics, samples
    @override
    def step_statistics(self, exp: Experience) -> None:
        """KL to the reference (mean per scored completion), value statistics and the advantages' spread."""
        mask, stats = exp.mask, exp.stats
        scored = (~torch.isnan(exp.rewards)).to(self.device).float()
        # a sum and a count, each averaged over the processes: their ratio is the mean over every process's scored
        # completions (a process with none of its own adds nothing, instead of a NaN); :meth:`end_step` divides
        stats.set("kl_sum", (exp.kl.sum(-1) * scored).sum())
        stats.set("kl_scored", scored.sum())
        stats.set("explained_variance", explained_variance(exp.values, exp.returns, mask))
        stats.set("value_mean", masked_mean(exp.values, mask))
        stats.set("return_mean", masked_mean(exp.returns, mask))
        stats.set("advantage_std", masked_std(exp.advantages, mask))

    @override
    def end_step(self, exp: Experience, values: dict[str, float]) -> None:
        """Log the KL coefficient of this step, then adapt it to the step's KL (when ``kl_target`` is set)."""
        kl_sum, count = values.pop("kl_sum"), values.pop("kl_scored")
        values["kl"] = kl_sum / count if count > 0 else math.nan
        values["non_score_reward"] = -self.kl_ctl.value * values["kl"]
        values["kl_coef"] = self.kl_ctl.value
        # the horizon counts the scored sequences of every process, as the KL does: over_processes averaged them
        processes = self.trainer.world_size if self.sum_over_processes() is not None else 1
        self.kl_ctl.update(values["kl"], round(count * processes))

    @override
    def sample_columns(self, exp: Experience) -> dict[str, torch.Tensor]:
        """The KL of each completion to the reference, then its advantage (mean over its tokens)."""
        return {"kl": exp.kl.sum(-1), **super().sample_columns(exp)}
