"""PPO with a value head, KL-shaped rewards and GAE, as a LightningModule (manual optimization)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from typing_extensions import override

from lightning_rl.algorithms.gae import check_discount, explained_variance, gae, whiten
from lightning_rl.algorithms.losses import clipped_surrogate, masked_mean
from lightning_rl.algorithms.mini_batches import mini_batch_bounds
from lightning_rl.algorithms.ppo_losses import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    KLEstimator,
    approx_kl,
    clipped_value_loss,
    kl_penalty,
    token_rewards,
)
from lightning_rl.logprobs import Backend
from lightning_rl.lora import apply_lora
from lightning_rl.models import EMBEDDED_DEFAULT, enable_activation_checkpointing, load_policy
from lightning_rl.modules.policy import PolicyModule
from lightning_rl.modules.value_head import (
    ValueHead,
    completion_hidden_states,
    hidden_size_of,
    logprobs_from_hidden,
)
from lightning_rl.rewards.reward_model import RewardModel, same_tokenizer
from lightning_rl.rewards.reward_set import RewardSet
from lightning_rl.rollout.engine import Rollout, SamplingConfig

_STEP_METRICS = (
    "reward", "reward_std", "kl", "kl_coef", "non_score_reward", "policy_loss", "value_loss", "loss",
    "clip_frac", "value_clip_frac", "approx_kl", "entropy", "explained_variance", "value_mean", "return_mean",
    "advantage_std", "completion_length", "truncated_frac", "grad_norm", "rollout_time", "train_time",
    "tokens_per_sec",
)


class PPO(PolicyModule):
    """Proximal Policy Optimization with a learned value function (Ouyang et al. / Ziegler et al. recipe).

    Each training step takes a batch of prompts and a rollout (from a callback under
    ``batch["rollout"]``, else sampled with the default engine), scores every completion with the
    reward functions and/or the reward model, puts that score on the last token and a per-token
    KL penalty to the reference on every token, estimates advantages with GAE (whitened), then runs
    ``ppo_epochs`` passes of clipped policy + clipped value + entropy updates over minibatches.

    Args:
        reward_funcs: callables ``f(prompts, completions, **columns) -> list[float | None]``.
        reward_weights: weight of each reward function, then of the reward model (default 1.0 each).
        reward_model: a :class:`~lightning_rl.rewards.RewardModel` scored like one more reward function.
        num_generations: completions sampled per prompt.
        max_new_tokens: generation limit per completion.
        temperature: sampling temperature (> 0), also applied to the trainer's log-probs.
        top_p: nucleus sampling threshold.
        top_k: top-k sampling (None disables).
        cliprange: clip range of the policy ratio.
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
        ppo_epochs: passes over each rollout.
        num_mini_batches: optimizer steps per pass, on near-equal shares of the completions (fewer
            when the batch has fewer completions).
        micro_batch_size: sequences per forward/backward (gradients accumulate over them); None (default):
            sized by the memory plan or the free device memory (see ``PolicyModule.micro_batch_for``).
        generation_batch_size: sequences per ``generate`` call of the default engine.
        critic_model: a separate critic (model source as for ``model``; same tokenizer as the policy);
            None puts the value head on the policy's backbone.
        critic_model_config: config overrides for a tiny critic model.
        value_learning_rate: learning rate of the value head and critic (default ``learning_rate``).
        value_head_dropout: dropout before the value head's Linear.
        val_max_new_tokens: generation limit for validation (greedy); defaults to ``max_new_tokens``.
        model: model source (see :func:`lightning_rl.models.load_policy`).
        model_config: config overrides for the tiny test models.
        dtype: weight dtype.
        lora: LoRA settings; with LoRA the adapters and the value head train, the base stays frozen.
        learning_rate: AdamW learning rate of the policy (when no ``optimizer``).
        weight_decay: AdamW weight decay.
        optimizer: a callable ``params -> Optimizer`` (LightningCLI ``OptimizerCallable``); it gets
            two parameter groups (policy, value) so ``value_learning_rate`` still applies.
        lr_scheduler: a callable ``optimizer -> LRScheduler``.
        max_grad_norm: gradient-norm clip (None or 0 disables).
        logprob_backend: ``auto``, ``triton`` or ``reference``.
        logprob_chunk_size: tokens per chunk of the reference log-prob path.
        system_prompt: optional system message.
        chat_template: render plain-text prompts with the chat template.
        max_prompt_length: refuse longer prompts (or truncate with ``truncate_prompts``).
        truncate_prompts: keep the last ``max_prompt_length`` prompt tokens instead of refusing.
        gradient_checkpointing: recompute activations in the backward; None (default): on CUDA devices.
        max_nonfinite_steps: consecutive non-finite steps skipped before training stops.
        max_unscored_steps: steps in a row where no completion got a reward before an error (0: never).
    """

    generates_rollouts = True

    def __init__(
        self,
        reward_funcs: Sequence[Callable[..., Any]] | None = None,
        reward_weights: Sequence[float] | None = None,
        reward_model: RewardModel | None = None,
        num_generations: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        cliprange: float = 0.2,
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
        ppo_epochs: int = 4,
        num_mini_batches: int = 1,
        micro_batch_size: int | None = None,
        generation_batch_size: int = 64,
        critic_model: str | None = None,
        critic_model_config: dict[str, Any] | None = None,
        value_learning_rate: float | None = None,
        value_head_dropout: float = 0.0,
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
        self.gamma, self.lam = check_discount("gamma", gamma), check_discount("lam", lam)
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for training rollouts, got {temperature}")
        micro = 1 if micro_batch_size is None else micro_batch_size
        for name, v in (("num_generations", num_generations), ("ppo_epochs", ppo_epochs),
                        ("num_mini_batches", num_mini_batches), ("micro_batch_size", micro),
                        ("generation_batch_size", generation_batch_size)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if cliprange <= 0 or (cliprange_value is not None and cliprange_value <= 0):
            raise ValueError(f"cliprange and cliprange_value must be > 0, got {cliprange} and {cliprange_value}")
        if vf_coef < 0 or ent_coef < 0:
            raise ValueError(f"vf_coef and ent_coef must be >= 0, got {vf_coef} and {ent_coef}")
        if value_learning_rate is not None and value_learning_rate <= 0:
            raise ValueError(f"value_learning_rate must be > 0, got {value_learning_rate}")
        funcs = list(reward_funcs or [])
        if reward_model is not None:
            funcs.append(reward_model)
        if not funcs:
            raise ValueError("PPO needs a reward: give reward_funcs=[...], reward_model=RewardModel(...), or both")
        self.save_hyperparameters(ignore=["reward_model"])
        self.rewards = RewardSet(funcs, reward_weights)
        self.reward_models = [f for f in funcs if isinstance(f, RewardModel)]
        self.num_generations = num_generations
        self.sampling = SamplingConfig(max_new_tokens, temperature, top_p, top_k)
        self.val_sampling = SamplingConfig(val_max_new_tokens or max_new_tokens, temperature=0.0)
        self.cliprange, self.cliprange_value = cliprange, cliprange_value
        self.vf_coef, self.ent_coef = vf_coef, ent_coef
        self.kl_estimator = kl_estimator
        self.kl_ctl = AdaptiveKLController(kl_coef, kl_target, kl_horizon)
        self.whiten_advantages = whiten_advantages
        self.ppo_epochs, self.num_mini_batches = ppo_epochs, num_mini_batches
        self.micro_batch_size, self.generation_batch_size = micro_batch_size, generation_batch_size
        self.critic_model, self.critic_model_config = critic_model, critic_model_config
        self.value_learning_rate = value_learning_rate or learning_rate
        self.value_head_dropout = value_head_dropout
        self.value_head: ValueHead | None = None
        self.critic: nn.Module | None = None
        per_fn = [f"reward/{n}" for n in self.rewards.names]
        self.make_metrics([*_STEP_METRICS, *per_fn], ["reward", *per_fn])

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
            if not same_tokenizer(tok, self.tokenizer):
                raise ValueError(
                    f"the critic {self.critic_model!r} uses another tokenizer than the policy {self.model_source!r}; "
                    "a critic reads the policy's token ids, so pick one of the same model family or leave "
                    "critic_model=None to put the value head on the policy's backbone"
                )
            if self.gradient_checkpointing:
                enable_activation_checkpointing(critic)
                if self.lora is not None:
                    critic.enable_input_require_grads()
            self.critic = apply_lora(critic, self.lora)
        self.value_head = ValueHead(hidden_size_of(self.critic or self.policy), self.value_head_dropout)
        for rm in self.reward_models:
            rm.check_tokenizer(self.tokenizer)

    def value_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the value head and the critic."""
        mods = [m for m in (self.value_head, self.critic) if m is not None]
        return [p for m in mods for p in m.parameters() if p.requires_grad]

    @override
    def configure_optimizers(self):
        """AdamW (or the given callable) over two groups: policy at ``learning_rate``, value at its own."""
        value = self.value_parameters()
        ids = {id(p) for p in value}
        policy = [p for p in self.trainable_parameters() if id(p) not in ids]
        if not policy:
            raise ValueError("the policy has no trainable parameters; check the lora settings")
        groups = [{"params": policy, "lr": self.learning_rate}, {"params": value, "lr": self.value_learning_rate}]
        if self.optimizer_factory is not None:
            opt = self.optimizer_factory(groups)
        else:
            opt = torch.optim.AdamW(groups, lr=self.learning_rate, weight_decay=self.weight_decay)
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"}}

    @override
    def on_fit_start(self) -> None:
        """Move the reference copy and the reward models to the training device."""
        super().on_fit_start()
        for rm in self.reward_models:
            rm.to(self.device)

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

    # ----------------------------------------------------------------------------- rollouts
    def policy_and_values(self, rollout: Rollout, rows: slice | torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(logp, entropy, values)``, each ``[n, C]``, for ``rows``: one backbone forward when shared."""
        args = (rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.completion_ids[rows],
                rollout.completion_mask[rows])
        temp = self.sampling.temperature
        if self.critic is None:
            hidden = completion_hidden_states(self.policy, *args)
            logp, ent = logprobs_from_hidden(self.policy, hidden, args[2], args[3], temp, self.logprob_backend,
                                             self.logprob_chunk_size)
        else:
            logp, ent = self.sequence_logprobs(self.policy, rollout, rows, temp)
            hidden = completion_hidden_states(self.critic, *args)
        values = self.value_head(hidden) * args[3].float()
        return logp, ent, values

    @torch.no_grad()
    def _rollout_stats(
        self, rollout: Rollout, micro: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Old log-probs, old values and (when the KL penalty is on) reference log-probs, without grad."""
        old_lp, old_v, ref_lp = [], [], []
        for start in range(0, rollout.num_sequences, micro):
            rows = slice(start, start + micro)
            lp, _, v = self.policy_and_values(rollout, rows)
            old_lp.append(lp)
            old_v.append(v)
        if self.needs_reference_model:
            with self.reference_model() as ref:
                for start in range(0, rollout.num_sequences, micro):
                    rows = slice(start, start + micro)
                    ref_lp.append(self.sequence_logprobs(ref, rollout, rows, self.sampling.temperature)[0])
        return torch.cat(old_lp), torch.cat(old_v), torch.cat(ref_lp) if ref_lp else None

    def _sum_over_processes(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """All-reduce (sum) over the trainer's processes under DDP/FSDP, so every rank whitens alike."""
        trainer = self._trainer
        if trainer is None or trainer.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return None
        return lambda t: trainer.strategy.reduce(t, reduce_op="sum")

    # ----------------------------------------------------------------------------- training
    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One rollout, then ``ppo_epochs * num_mini_batches`` optimizer steps on it."""
        prompts = batch["prompt"]
        t0 = time.perf_counter()
        rollout = batch.get("rollout")
        rollout = self.generate_rollout(prompts) if rollout is None else rollout.to(self.device)
        rollout_time = time.perf_counter() - t0
        g, n = self.num_generations, rollout.num_sequences
        if n != len(prompts) * g:
            raise ValueError(f"the rollout has {n} completions for {len(prompts)} prompts; expected {g} each")
        bounds = mini_batch_bounds(n, self.num_mini_batches)
        micro = self.micro_batch_for(max(hi - lo for lo, hi in bounds), rollout.sequence_length)
        total, per_fn, completions = self.score(prompts, rollout, self.columns_of(batch), g)
        total = total.to(self.device)
        scored = ~torch.isnan(total)  # completions no reward applies to stay out of the loss
        mask = rollout.completion_mask.float() * scored.float()[:, None]

        t1 = time.perf_counter()
        old_logp, old_values, ref_logp = self._rollout_stats(rollout, micro)
        kl = kl_penalty(old_logp, ref_logp, self.kl_estimator) * mask if ref_logp is not None \
            else torch.zeros_like(old_logp)
        kl_coef = self.kl_ctl.value
        rewards = token_rewards(torch.nan_to_num(total), kl, mask, kl_coef)
        advantages, returns = gae(rewards, old_values, mask, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = whiten(advantages, mask, reduce=self._sum_over_processes())
        self.record_rollout_samples(prompts, completions, total, per_fn, g, kl=kl.sum(-1),
                                    advantage=(advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1))

        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        for _ in range(self.ppo_epochs):
            order = torch.randperm(n).to(self.device)
            for lo, hi in bounds:
                idx = order[lo:hi]
                tokens = mask[idx].sum().clamp(min=1)
                step_loss = torch.zeros((), device=self.device)
                for s in range(0, hi - lo, micro):
                    mb = idx[s : s + micro]
                    step_loss = step_loss + self._micro_step(rollout, mb, mask[mb], tokens, old_logp[mb],
                                                             old_values[mb], advantages[mb], returns[mb], stats)
                result = self.optimizer_step_checked(step_loss)
                stats["loss"].append(step_loss)
                stats["grad_norm"].append(torch.tensor(result["grad_norm"]))
        train_time = time.perf_counter() - t1

        seq_kl = kl.sum(-1)[scored]
        mean_kl = seq_kl.mean().item() if seq_kl.numel() else float("nan")
        self.kl_ctl.update(mean_kl, int(scored.sum()))
        lengths = rollout.completion_mask.sum(-1).float()
        finite = total[scored]
        means = {k: torch.stack([x.float().to(self.device) for x in v]).mean() for k, v in stats.items() if v}
        values = dict(zip(means, torch.stack(list(means.values())).tolist()))  # one sync for the step statistics
        values.update(
            reward=finite.mean().item() if finite.numel() else float("nan"),
            reward_std=finite.std().item() if finite.numel() > 1 else 0.0,
            kl=mean_kl,
            kl_coef=kl_coef,
            non_score_reward=(-kl_coef * seq_kl).mean().item() if seq_kl.numel() else float("nan"),
            explained_variance=explained_variance(old_values, returns, mask),
            value_mean=masked_mean(old_values, mask).item(),
            return_mean=masked_mean(returns, mask).item(),
            advantage_std=advantages[mask.bool()].std().item() if mask.sum() > 1 else 0.0,
            completion_length=lengths.mean().item(),
            truncated_frac=rollout.truncated.float().mean().item(),
            rollout_time=rollout_time,
            train_time=train_time,
            tokens_per_sec=lengths.sum().item() / max(rollout_time, 1e-9),
        )
        for j, name in enumerate(self.rewards.names):
            col = per_fn[:, j][~torch.isnan(per_fn[:, j])]
            if col.numel():
                values[f"reward/{name}"] = col.mean().item()
        self.check_health(total, per_fn, values)
        self.log_values("train", values, len(prompts), prog_bar=("reward", "kl", "value_loss"))

    def _micro_step(
        self, rollout: Rollout, rows: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor,
        old_logp: torch.Tensor, old_values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
        stats: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        """Forward, loss and backward of one micro-batch; its loss is its share of the minibatch's token mean.

        Returns the detached loss; statistics are appended to ``stats`` as device tensors.
        """
        logp, ent, values = self.policy_and_values(rollout, rows)
        pg = clipped_surrogate(logp, old_logp, advantages, self.cliprange)
        vf = clipped_value_loss(values, old_values, returns, self.cliprange_value)
        per_token = pg.loss + self.vf_coef * vf.loss - self.ent_coef * ent
        loss = (per_token * mask).sum() / tokens
        self.manual_backward(loss)
        stats["policy_loss"].append(masked_mean(pg.loss.detach(), mask))
        stats["value_loss"].append(masked_mean(vf.loss.detach(), mask))
        stats["clip_frac"].append(masked_mean((pg.clipped_low | pg.clipped_high).float(), mask))
        stats["value_clip_frac"].append(masked_mean(vf.clipped.float(), mask))
        stats["approx_kl"].append(masked_mean(approx_kl(logp.detach(), old_logp), mask))
        stats["entropy"].append(masked_mean(ent.detach(), mask))
        return loss.detach()

    # ----------------------------------------------------------------------------- evaluation
    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Greedy completions for held-out prompts; logs the mean reward (overall and per function)."""
        self.log_greedy_rewards(batch)
