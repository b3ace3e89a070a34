"""The on-policy base of GRPO and PPO: rollout, rewards, advantages, loss, optimizer step, in numbered steps."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from typing_extensions import override

from lightning_rl.algorithms.losses import SurrogateTerms
from lightning_rl.algorithms.mini_batches import check_mini_batches, mini_batch_bounds
from lightning_rl.hparams import as_instance
from lightning_rl.modules.config_checks import check_clip_range
from lightning_rl.modules.experience import Experience, PolicyOutput, Rows, row_count, sub_rows
from lightning_rl.modules.policy import DEFAULT_SAMPLING, PolicyModule
from lightning_rl.modules.resume_state import training_rng_kept
from lightning_rl.modules.rollout_layout import attach_host_lengths, check_rollout_layout
from lightning_rl.modules.sequence_limits import check_data_prompts
from lightning_rl.rewards.reward_model import RewardModel
from lightning_rl.rewards.reward_set import RewardSet
from lightning_rl.rollout.engine import Rollout, SamplingConfig
from lightning_rl.samples import StepSamples, per_completion
from lightning_rl.shapes import datamodule_batch_size
from lightning_rl.whole_numbers import is_whole_number

RewardFunc = Callable[..., Any]

_STEP_METRICS = (
    "reward", "reward_std", "loss", "grad_norm", "entropy", "clip_ratio", "clip_ratio_low", "clip_ratio_high",
    "completion_length", "completion_length_max", "truncated_frac", "rollout_time", "train_time", "tokens_per_sec",
)


def prompts_per_batch(trainer: Any) -> int | None:
    """Prompts of a full training batch of one process, as the trainer's DataModule states them, or None.

    Its ``batch_size``, and no more than one process's share of its training rows (a dataset smaller than a
    batch makes smaller batches). A resumed fit whose first batch is an epoch's smaller last one still counts
    the full batch.
    """
    prompts = datamodule_batch_size(trainer)
    rows = getattr(getattr(trainer, "datamodule", None), "train_rows", None)
    if prompts is not None and isinstance(rows, Sequence) and rows:
        prompts = min(prompts, math.ceil(len(rows) / max(1, int(getattr(trainer, "world_size", 1) or 1))))
    return prompts


class OnPolicyModule(PolicyModule):
    """Base of the methods that learn from completions they sample at every step (GRPO, PPO).

    :meth:`training_step` runs these steps in order; a subclass (or your own subclass of GRPO or PPO)
    changes a step by overriding the method named in brackets, not by copying the training step:

    1. **Rollout**: the completions a callback attached to the batch under ``"rollout"`` (e.g.
       :class:`~lightning_rl.callbacks.VLLMRollout`), else ``num_generations`` per prompt from
       :meth:`generate_rollout`.
    2. **Rewards**: every completion scored by the reward functions; [:meth:`loss_mask`] picks the
       tokens that count.
    3. **Advantages**: the no-grad passes the loss needs, such as old and reference log-probs or
       values [:meth:`prepare`], then [:meth:`compute_advantages`].
    4. **Loss**: ``num_iterations`` passes over the rollout, each in ``num_mini_batches`` mini-batches
       of micro-batches: a forward [:meth:`policy_forward`], the per-token loss [:meth:`policy_loss`],
       weighted so that the micro-batches add up to the mini-batch's loss [:meth:`loss_weights`], a backward.
    5. **Optimizer step**: one per mini-batch (skipped, weights untouched, on a NaN/inf loss or gradient).
    6. **Metrics**: the step's statistics [:meth:`step_statistics`] read back from the device once and
       logged with the rewards; the step's completions kept as ``last_samples``; health checks.

    Args:
        reward_funcs: callables ``f(prompts, completions, **columns) -> list[float | None]`` (import paths
            or ``{class_path, init_args}`` in YAML); a :class:`~lightning_rl.rewards.RewardModel` is one too.
        num_generations: completions sampled per prompt.
        num_iterations: passes over each rollout.
        reward_weights: weight of each reward function (default 1.0 each).
        sampling: how training completions are sampled: a :class:`~lightning_rl.rollout.SamplingConfig`
            (or a mapping of its fields) with ``max_new_tokens``, ``temperature`` (> 0; the trainer's
            log-probs use it too), ``top_p`` and ``top_k``.
        val_sampling: how validation and :meth:`evaluate` sample; None: greedy, up to ``sampling.max_new_tokens``.
        epsilon: clip range of the probability ratio: ``[1 - epsilon, 1 + epsilon_high]``.
        epsilon_high: upper clip range (DAPO's clip-higher); None: ``epsilon``.
        num_mini_batches: optimizer steps per pass over the rollout, on near-equal shares of its
            completions (fewer when it has fewer completions).
        micro_batch_size: completions per forward/backward (gradients accumulate; the loss is the
            mini-batch's). None (default): as many as the memory plan of
            :class:`~lightning_rl.plugins.MemoryAwarePrecision` allows, else what the free device memory
            holds (all of them on a CPU); see :meth:`micro_batch_for`.
        generation_batch_size: sequences per ``generate`` call of the default engine.
        **kwargs: the :class:`~lightning_rl.modules.policy.PolicyModule` arguments (model, lora, learning_rate, ...).
    """

    generates_rollouts = True
    #: Metrics a subclass logs besides the shared ones.
    step_metrics: tuple[str, ...] = ()
    #: Metrics shown in the progress bar.
    progress_bar_metrics: tuple[str, ...] = ("reward", "kl")

    def __init__(
        self,
        reward_funcs: Sequence[RewardFunc],
        num_generations: int,
        num_iterations: int,
        reward_weights: Sequence[float] | None = None,
        sampling: SamplingConfig = DEFAULT_SAMPLING,
        val_sampling: SamplingConfig | None = None,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        num_mini_batches: int = 1,
        micro_batch_size: int | None = None,
        generation_batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        sampling = as_instance(sampling, SamplingConfig)
        val_sampling = None if val_sampling is None else as_instance(val_sampling, SamplingConfig)
        if sampling.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for training rollouts, got {sampling.temperature}")
        micro = 1 if micro_batch_size is None else micro_batch_size
        for name, v in (("num_generations", num_generations), ("num_iterations", num_iterations),
                        ("num_mini_batches", num_mini_batches), ("micro_batch_size", micro),
                        ("generation_batch_size", generation_batch_size)):
            if not is_whole_number(v, 1):
                raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
        if not (0 < epsilon <= 1) or (epsilon_high is not None and not (0 < epsilon_high < math.inf)):
            raise ValueError(f"epsilon must be in (0, 1] (the ratio is clipped to 1 - epsilon below; 1 leaves it "
                             f"unclipped there) and epsilon_high a finite number > 0; got {epsilon} and {epsilon_high}")
        check_clip_range(epsilon, epsilon_high)
        super().__init__(**kwargs)
        self.rewards = RewardSet(reward_funcs, reward_weights)
        self.reward_models = [f for f in self.rewards.funcs if isinstance(f, RewardModel)]
        self.num_generations, self.num_iterations = num_generations, num_iterations
        self.num_mini_batches, self.sampling = num_mini_batches, sampling
        self.val_sampling = val_sampling or SamplingConfig(sampling.max_new_tokens, temperature=0.0)
        self.epsilon, self.epsilon_high = epsilon, epsilon_high
        self.micro_batch_size, self.generation_batch_size = micro_batch_size, generation_batch_size
        per_fn = [f"reward/{n}" for n in self.rewards.names]
        self.make_metrics([*_STEP_METRICS, *self.step_metrics, *per_fn], ["reward", *per_fn])

    @override
    def configure_model(self) -> None:
        """Load the policy (see :class:`PolicyModule`); say whether each reward model shares its tokenizer."""
        first = self.policy is None
        super().configure_model()
        if first:
            for rm in self.reward_models:
                rm.check_tokenizer(self.tokenizer)

    @override
    def on_fit_start(self) -> None:
        """Move the reference copy and the reward models to the training device; check the data's prompts.

        Every prompt the DataModule keeps is rendered once and checked against ``max_prompt_length`` and the
        model's positions (:func:`~lightning_rl.modules.sequence_limits.check_data_prompts`), so a prompt too long
        stops the fit here, named by its row, not when its batch comes up; and ``num_mini_batches`` against the
        completions of a batch as the DataModule states it (:func:`check_mini_batches`).
        """
        super().on_fit_start()
        check_data_prompts(self, self.trainer.datamodule)
        prompts = prompts_per_batch(self.trainer)
        if prompts is not None:
            check_mini_batches(self.num_mini_batches, prompts, self.num_generations)
        for rm in self.reward_models:
            rm.to(self.device)

    # ----------------------------------------------------------------------------- the step
    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One rollout, then ``num_iterations * num_mini_batches`` optimizer steps on it (steps 1-6 above)."""
        t0 = time.perf_counter()
        rollout = self.rollout_of(batch)  # 1. rollout
        rollout_time = time.perf_counter() - t0
        exp = self.score_rollout(batch, rollout)  # 2. rewards
        t1 = time.perf_counter()
        self.prepare(exp)  # 3. advantages
        exp.advantages = self.compute_advantages(exp)
        self.record_samples(exp)
        self.update(exp)  # 4. loss, 5. optimizer steps
        self.log_step(exp, rollout_time, time.perf_counter() - t1)  # 6. metrics

    def rollout_of(self, batch: Mapping[str, Any]) -> Rollout:
        """Step 1: the batch's attached rollout (moved to the device), else one sampled here; G per prompt.

        Its layout is checked where it arrives (an engine's rollout in host memory: without reading the device), and
        the rows' lengths from that check stay with it, so that the packed forwards never read the device.
        """
        prompts = batch["prompt"]
        rollout = batch.get("rollout")
        rollout = self.generate_rollout(prompts) if rollout is None else rollout
        g, n = self.num_generations, rollout.num_sequences
        if n != len(prompts) * g:
            raise ValueError(f"the rollout has {n} completions for {len(prompts)} prompts; expected {g} each")
        lengths = check_rollout_layout(rollout)
        return attach_host_lengths(rollout.to(self.device), lengths)

    @property
    @override
    def optimizer_steps_per_batch(self) -> int:
        """``num_iterations * num_mini_batches``."""
        return self.num_iterations * self.num_mini_batches

    def score_rollout(self, batch: Mapping[str, Any], rollout: Rollout) -> Experience:
        """Step 2: rewards of every completion, the loss mask and the step's micro-batch size."""
        prompts = batch["prompt"]
        total, per_fn, completions = self.score(prompts, rollout, self.columns_of(batch), self.num_generations)
        bounds = mini_batch_bounds(rollout.num_sequences, self.num_mini_batches)
        # the longest padded length of any process: with a token budget, every process then makes as many
        # micro-batches (each backward of a DDP module is a collective)
        tokens = int(self.reduce_over_processes([rollout.sequence_length], dist.ReduceOp.MAX)[0])
        micro = self.micro_batch_for(max(hi - lo for lo, hi in bounds), tokens)
        return Experience(prompts, rollout, total, per_fn, completions, self.loss_mask(rollout, total), micro)

    def loss_mask(self, rollout: Rollout, rewards: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` float mask of the tokens that count in the loss (default: every completion token)."""
        return rollout.completion_mask.float()

    def prepare(self, exp: Experience) -> None:
        """Step 3, first part: fill what the loss needs besides the rollout (``old_logp``, ``ref_logp``, ...)."""

    def compute_advantages(self, exp: Experience) -> torch.Tensor:
        """Step 3: ``[N]`` (per completion) or ``[N, C]`` (per token) advantages of the step's completions."""
        raise NotImplementedError

    def update(self, exp: Experience) -> None:
        """Steps 4-5: ``num_iterations`` passes of ``num_mini_batches`` optimizer steps over the rollout."""
        n, micro = exp.num_completions, exp.micro_batch_size
        bounds = mini_batch_bounds(n, self.num_mini_batches)
        for iteration in range(self.num_iterations):
            exp.iteration = iteration
            order = self.mini_batch_order(n)
            for lo, hi in bounds:
                rows: Rows = slice(lo, hi) if order is None else order[lo:hi]
                weights = self.loss_weights(exp, rows)
                step_loss = torch.zeros((), device=self.device)
                for start in range(0, hi - lo, micro):
                    mb = sub_rows(rows, start, start + micro)
                    out = self.policy_forward(exp, mb)
                    loss = (self.policy_loss(exp, mb, out) * weights[start : start + row_count(mb)]).sum()
                    self.manual_backward(loss)
                    step_loss = step_loss + loss.detach()
                    exp.stats.add_token_mean("entropy", out.entropy.detach(), exp.mask[mb])
                result = self.optimizer_step_checked(step_loss)
                exp.stats.add("loss", step_loss)
                exp.stats.add("grad_norm", result["grad_norm"])

    def mini_batch_order(self, n: int) -> torch.Tensor | None:
        """The order of the ``n`` completions in this pass's mini-batches; None keeps the rollout's order."""
        return None

    def loss_weights(self, exp: Experience, rows: Rows) -> torch.Tensor:
        """``[m, C]`` weights of a mini-batch's per-token losses: its loss is ``sum(per_token_loss * weights)``."""
        raise NotImplementedError

    def policy_forward(self, exp: Experience, rows: Rows) -> PolicyOutput:
        """Step 4: the policy's token log-probs and entropy on the completions ``rows`` (with grad)."""
        logp, ent = self.sequence_logprobs(self.policy, exp.rollout, rows, self.sampling.temperature)
        return PolicyOutput(logp, ent)

    def policy_loss(self, exp: Experience, rows: Rows, out: PolicyOutput) -> torch.Tensor:
        """Step 4: ``[m, C]`` per-token loss of the completions ``rows``; statistics go to ``exp.stats``."""
        raise NotImplementedError

    def record_clipping(self, exp: Experience, terms: SurrogateTerms, mask: torch.Tensor) -> None:
        """Add the shares of tokens whose ratio was clipped below, above, and either (``clip_ratio``)."""
        low, high = terms.clipped_low.float(), terms.clipped_high.float()
        exp.stats.add_token_mean("clip_ratio_low", low, mask)
        exp.stats.add_token_mean("clip_ratio_high", high, mask)
        exp.stats.add_token_mean("clip_ratio", low + high, mask)

    # ----------------------------------------------------------------------------- metrics, samples
    def step_statistics(self, exp: Experience) -> None:
        """Step 6: add the step's own statistics to ``exp.stats`` as device tensors (read back with the rest)."""

    def reward_statistics(self, exp: Experience) -> dict[str, float]:
        """Mean and std of the rewards, and the mean of each function's (NaN left out; on the CPU)."""
        finite = exp.rewards[~torch.isnan(exp.rewards)]
        std = finite.std().item() if finite.numel() > 1 else (0.0 if finite.numel() else float("nan"))
        values = {"reward": finite.mean().item() if finite.numel() else float("nan"), "reward_std": std}
        for j, name in enumerate(self.rewards.names):
            col = exp.rewards_per_function[:, j]
            col = col[~torch.isnan(col)]
            values[f"reward/{name}"] = col.mean().item() if col.numel() else float("nan")  # logged as a gap
        return values

    def log_step(self, exp: Experience, rollout_time: float, train_time: float) -> None:
        """Step 6: read the statistics back once, check the run's health, log everything."""
        lengths = exp.rollout.completion_mask.sum(-1).float()
        exp.stats.set("completion_length", lengths.mean())
        exp.stats.set("completion_length_max", lengths.max())
        exp.stats.set("truncated_frac", exp.rollout.truncated.float().mean())
        exp.stats.set("completion_tokens", lengths.sum())
        self.step_statistics(exp)
        values = self.over_processes(exp.stats.read(self.device))  # the one read-back of the step
        tokens = values.pop("completion_tokens")
        everyone = self.with_all_rewards(exp)
        values.update(self.reward_statistics(everyone), rollout_time=rollout_time,
                      train_time=train_time, tokens_per_sec=tokens / max(rollout_time, 1e-9))
        self.end_step(exp, values)
        # every process's rewards: each process decides alike (one stopping alone would leave the others waiting
        # in the next collective), and rank 0's checkpoint holds the streak every process counted
        self.health.check_rewards(everyone.rewards, everyone.rewards_per_function, self.rewards.names,
                                  self.global_step)
        self.health.check_collapse(values, self.global_step)
        self.health.check_signal(values, self.global_step, bool(getattr(self, "mask_truncated_completions", False)))
        self.log_values("train", values, len(exp.prompts), prog_bar=self.progress_bar_metrics)

    def over_processes(self, values: dict[str, float]) -> dict[str, float]:
        """Under DDP/FSDP, the step statistics of every process: means (maxima for ``*_max``), in two all-reduces.

        Every process logs the same figures, those of the whole step; in a single process ``values`` as is.
        """
        reduce = self.sum_over_processes()
        if reduce is None or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        means = (reduce(t) / self.trainer.world_size).tolist()
        maxima = self.trainer.strategy.reduce(t, reduce_op=dist.ReduceOp.MAX).tolist()
        return {k: (hi if k.endswith("_max") else mean) for k, mean, hi in zip(keys, means, maxima)}

    def with_all_rewards(self, exp: Experience) -> Experience:
        """``exp`` with the rewards of every process (gathered under DDP/FSDP), for the reward statistics."""
        if self.sum_over_processes() is None:
            return exp
        f = exp.rewards_per_function.shape[-1]
        total = self.all_gather(exp.rewards.to(self.device)).reshape(-1).cpu()
        per_fn = self.all_gather(exp.rewards_per_function.to(self.device)).reshape(-1, f).cpu()
        return dataclasses.replace(exp, rewards=total, rewards_per_function=per_fn)

    def end_step(self, exp: Experience, values: dict[str, float]) -> None:
        """After the statistics are read: adapt state to them (PPO's KL coefficient); may add to ``values``."""

    def sample_columns(self, exp: Experience) -> dict[str, torch.Tensor]:
        """Columns of the sample tables besides prompt, completion and rewards: the advantage per completion."""
        adv = exp.advantages
        if adv.dim() == 2:
            adv = (adv * exp.mask).sum(-1) / exp.mask.sum(-1).clamp(min=1)
        return {"advantage": adv}

    def record_samples(self, exp: Experience) -> None:
        """Keep the completions, rewards (total, per function) and :meth:`sample_columns` as ``last_samples``."""
        columns: dict[str, Any] = {"prompt": per_completion(exp.prompts, self.num_generations),
                                   "completion": exp.completions, "reward": exp.rewards}
        columns.update({f"reward/{n}": exp.rewards_per_function[:, j] for j, n in enumerate(self.rewards.names)})
        columns.update(self.sample_columns(exp))
        self.last_samples = StepSamples(columns, self.num_generations)

    @torch.no_grad()
    def no_grad_logprobs(self, model: torch.nn.Module, exp: Experience) -> torch.Tensor:
        """``[N, C]`` token log-probs of the whole rollout under ``model``, a micro-batch at a time, without grad."""
        rollout, micro, temp = exp.rollout, exp.micro_batch_size, self.sampling.temperature
        return torch.cat([self.sequence_logprobs(model, rollout, slice(s, s + micro), temp)[0]
                          for s in range(0, rollout.num_sequences, micro)])

    # ----------------------------------------------------------------------------- evaluation
    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Completions for held-out prompts (``val_sampling``: greedy by default); logs the mean reward.

        Sampling and scoring leave the training's random states as they were (:func:`training_rng_kept`).
        """
        with training_rng_kept():
            rollout = self.generate_rollout(batch["prompt"], sampling=self.val_sampling, num_generations=1)
            total, per_fn, _ = self.score(batch["prompt"], rollout, self.columns_of(batch), 1)
        values = {"reward": total, **{f"reward/{n}": per_fn[:, j] for j, n in enumerate(self.rewards.names)}}
        self.log_values("val", values, len(batch["prompt"]), prog_bar=("reward",))

    @torch.no_grad()
    def evaluate(self, rows: Sequence[Mapping[str, Any]], batch_size: int = 64,
                 prompt_column: str = "prompt") -> dict[str, Any]:
        """Completions (``val_sampling``) and rewards on ``rows`` outside a Trainer, e.g. before and after training.

        The random states are left as they were (:func:`training_rng_kept`): evaluating before a fit does not change
        what the fit samples.

        Args:
            rows: dicts with the prompt under ``prompt_column`` and the reward functions' columns.
            batch_size: prompts per generation.
            prompt_column: the rows' key of the prompt.

        Returns:
            ``{"reward": mean total reward, "reward/<fn>": ..., "completions": [...]}``.

        Raises:
            ValueError: no rows, or a row without ``prompt_column``.
        """
        if not len(rows):
            raise ValueError("evaluate() got no rows: pass a list of dicts with a prompt each")
        missing = next((i for i, r in enumerate(rows) if prompt_column not in r), None)
        if missing is not None:
            raise ValueError(f"row {missing} has no {prompt_column!r} column (its keys: {sorted(rows[missing])}); "
                             f"pass evaluate(rows, prompt_column=...) with the key that holds the prompt")
        self.configure_model()
        totals, per, texts = [], [], []
        with training_rng_kept():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                prompts = [r[prompt_column] for r in chunk]
                columns = {k: [r.get(k) for r in chunk] for k in chunk[0] if k != prompt_column}
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
