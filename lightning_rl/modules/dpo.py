"""DPO: direct preference optimization, offline (preference pairs) or online (pairs ranked by rewards)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from typing_extensions import override

from lightning_rl.algorithms.preference_losses import DPOLossType, check_dpo_settings, dpo_loss, sft_nll
from lightning_rl.hparams import as_instance
from lightning_rl.modules.policy import DEFAULT_SAMPLING
from lightning_rl.modules.preference import PairLosses, PreferenceModule, Sequences
from lightning_rl.modules.rollout_layout import check_rollout_layout
from lightning_rl.prompting import Prompt
from lightning_rl.rewards.reward_set import RewardSet
from lightning_rl.rollout.engine import Rollout, SamplingConfig

_TRAIN_METRICS = ("loss", "sft_loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy",
                  "logps/chosen", "logps/rejected", "grad_norm", "reward", "tie_frac", "rollout_time")
_PAIRED_FIX = ("use PreferenceDataModule(mode='paired') with prompt/chosen/rejected rows, or online=True with "
               "reward_funcs for prompt-only data")
_VAL_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy",
                "logp_accuracy", "reward")


def online_pairs(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank two completions per prompt: ``(chosen_col [B], valid [B])`` from rewards ``[B, 2]``.

    A pair is invalid (left out) when the rewards tie or either is NaN.
    """
    valid = ~torch.isnan(rewards).any(-1) & (rewards[:, 0] != rewards[:, 1])
    chosen_col = (rewards[:, 1] > rewards[:, 0]).long()
    return chosen_col, valid


class DPO(PreferenceModule):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290, eq. 7) and its variants.

    Offline, each batch holds preference pairs (``prompt``, ``chosen``, ``rejected``) from a
    :class:`~lightning_rl.data.PreferenceDataModule`. Online (``online=True``), each batch holds
    prompts: the rollout engine samples two completions per prompt, the reward functions rank
    them, and the better one is the chosen response (ties are left out). Chosen and rejected go
    through the policy in one forward. ``loss_type`` ``ipo`` is IPO (Azar et al. 2023,
    arXiv:2310.12036, Section 5) on summed log-probs as the paper writes it (TRL's divides each response's
    log-probs by its length first, so a ``beta`` tuned there aims at a per-token margin), ``hinge`` SLiC's loss,
    ``robust`` the robust DPO of Chowdhury et al. 2024 (see :mod:`lightning_rl.algorithms.preference_losses`).

    Online, a batch whose pairs all tie trains nothing and takes no optimizer step: it warns, and
    ``max_unscored_steps`` such batches in a row stop training with a
    :class:`~lightning_rl.rewards.RewardError` (``max_steps`` counts optimizer steps, so it would never end the run).

    Args:
        beta: inverse temperature of the implicit reward (IPO's ``tau``).
        loss_type: ``sigmoid`` (DPO), ``ipo``, ``hinge`` (SLiC) or ``robust``.
        label_smoothing: assumed label-flip probability for ``sigmoid`` (cDPO) and ``robust``.
        sft_weight: weight of an added SFT term (NLL per token of the chosen response, as in RPO).
        online: generate the pairs with the rollout engine and rank them with ``reward_funcs``.
        reward_funcs: reward callables ``f(prompts, completions, **columns)`` for online mode.
        reward_weights: weight of each reward function.
        sampling: how online completions are sampled (a :class:`~lightning_rl.rollout.SamplingConfig` or a
            mapping of its fields; ``temperature`` > 0 so that the two differ).
        generation_batch_size: sequences per ``generate`` call of the default engine.
        **kwargs: the :class:`~lightning_rl.modules.preference.PreferenceModule` arguments (``reference``,
            ``max_completion_length``, ``micro_batch_size`` in pairs) and the
            :class:`~lightning_rl.modules.policy.PolicyModule` ones (``model``, ``lora``, ``learning_rate``, ...).
    """

    num_generations = 2  # completions per prompt in online mode (read by rollout callbacks)

    @property
    def generates_rollouts(self) -> bool:  # type: ignore[override]
        """Online DPO samples two completions per prompt each step."""
        return bool(self.online)

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        online: bool = False,
        reward_funcs: Sequence[Callable[..., Any]] | None = None,
        reward_weights: Sequence[float] | None = None,
        sampling: SamplingConfig = DEFAULT_SAMPLING,
        generation_batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        sampling = as_instance(sampling, SamplingConfig)
        check_dpo_settings(beta, loss_type, label_smoothing)
        if sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
        if online and not reward_funcs:
            raise ValueError("online DPO ranks its two completions per prompt with reward functions: give "
                             "reward_funcs=[...]")
        if online and kwargs.get("reference") == "precomputed":
            raise ValueError("online DPO generates new responses every step, so their reference log-probs cannot "
                             "be precomputed: use reference='live' (or 'auto')")
        if online and sampling.temperature <= 0:
            raise ValueError(f"online DPO needs two different samples per prompt: temperature must be > 0, "
                             f"got {sampling.temperature}")
        if generation_batch_size < 1:
            raise ValueError(f"generation_batch_size must be >= 1, got {generation_batch_size}")
        super().__init__(**kwargs)
        self.beta, self.loss_type, self.label_smoothing, self.sft_weight = beta, loss_type, label_smoothing, sft_weight
        self.is_online = online
        self.rewards = RewardSet(reward_funcs, reward_weights) if reward_funcs else None
        self.sampling = sampling
        self.generation_batch_size = generation_batch_size
        self.make_metrics(_TRAIN_METRICS, _VAL_METRICS)

    @property
    @override
    def online(self) -> bool:
        return self.is_online

    @override
    def setup(self, stage: str) -> None:
        """Refuse online DPO over several processes (its pairs per process differ: see the error).

        Raises:
            ValueError: ``online=True`` with a trainer of more than one process.
        """
        super().setup(stage)
        if self.online and stage == "fit" and self._trainer is not None and self.trainer.world_size > 1:
            raise ValueError(
                f"online DPO runs in one process: each process keeps the pairs its own rewards rank, so the processes "
                f"would make different numbers of backward passes (DDP collectives) and wait on each other forever "
                f"({self.trainer.world_size} processes here). Train it on one device, or train offline DPO on pairs "
                "generated beforehand over several"
            )

    @override
    def reference_targets(self, batch: Mapping[str, Any]) -> list[tuple[Sequence[Prompt], Sequence[Any]]]:
        return [(batch["prompt"], batch["chosen"]), (batch["prompt"], batch["rejected"])]

    # ----------------------------------------------------------------------------- online pairs
    def online_batch(self, batch: Mapping[str, Any]) -> tuple[Sequences | None, dict[str, float]]:
        """Two completions per prompt, ranked by the rewards: ``(chosen rows then rejected rows, stats)``."""
        prompts = batch["prompt"]
        t0 = time.perf_counter()
        rollout: Rollout | None = batch.get("rollout")
        rollout = self.generate_rollout(prompts) if rollout is None else rollout.to(self.device)
        if rollout.num_sequences != 2 * len(prompts):
            raise ValueError(f"online DPO needs 2 completions per prompt; the rollout has {rollout.num_sequences} "
                             f"for {len(prompts)} prompts")
        check_rollout_layout(rollout)
        rollout_time = time.perf_counter() - t0
        columns = self.columns_of(batch, ("prompt", "rollout", "chosen", "rejected", "index"))
        total, per_fn, completions = self.score(prompts, rollout, columns, 2)
        self.health.check_rewards(total, per_fn, self.rewards.names, self.global_step)
        chosen_col, valid = online_pairs(total.view(-1, 2))
        self.health.check_pairs(int(valid.sum()), len(prompts), self.rewards.names, self.global_step)
        stats = {"reward": torch.nanmean(total).item(), "tie_frac": 1 - valid.float().mean().item(),
                 "rollout_time": rollout_time}
        if not valid.any():
            return None, stats
        pair = valid.nonzero().squeeze(-1).to(self.device)
        base = 2 * pair
        cc = chosen_col.to(self.device)[pair]
        rows = torch.cat([base + cc, base + 1 - cc])
        picked = rows.tolist()
        self._online_texts = ([prompts[i] for i in pair.tolist()], [completions[i] for i in picked[:len(pair)]],
                              [completions[i] for i in picked[len(pair):]])
        seqs = Sequences(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
        return seqs.rows(rows), stats

    # ----------------------------------------------------------------------------- loss
    def pair_losses(self, seqs: Sequences, ref: torch.Tensor | None, model=None) -> dict[str, torch.Tensor]:
        """Per-pair loss pieces for ``seqs`` = chosen rows then rejected rows (one forward)."""
        n = seqs.prompt_ids.shape[0] // 2
        token_logp = self.token_logps(model or self.policy, seqs)
        mask = seqs.completion_mask
        summed = (token_logp * mask).sum(-1)
        chosen, rejected = summed[:n], summed[n:]
        if ref is None:
            with torch.no_grad(), self.reference_model() as ref_model, self._eval_mode(ref_model):
                ref_sum = self.summed_logps(ref_model, seqs)
            ref = torch.stack([ref_sum[:n], ref_sum[n:]], dim=-1)
        out = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.beta, self.loss_type, self.label_smoothing)
        loss = out.loss
        sft = sft_nll(token_logp[:n], mask[:n])
        if self.sft_weight:
            loss = loss + self.sft_weight * sft
        return {"loss": loss, "sft_loss": sft.detach(), "rewards/chosen": out.chosen_rewards,
                "rewards/rejected": out.rejected_rewards, "rewards/margins": out.margins,
                "rewards/accuracy": out.accuracy, "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach(),
                "logp_accuracy": (chosen > rejected).float().detach()}

    def batch_sequences(self, batch: Mapping[str, Any]) -> Sequences:
        """Chosen rows then rejected rows of an offline batch."""
        return self.paired_sequences(batch, _PAIRED_FIX)

    @override
    def check_batch(self, batch: Mapping[str, Any]) -> None:
        if not self.online:
            self.require_pair_columns(batch, _PAIRED_FIX)

    def _losses(self, ref_all: torch.Tensor | None) -> PairLosses:
        """:meth:`pair_losses` with the precomputed reference log-probs of each micro-batch's pairs, if any."""
        return lambda sub, mb: self.pair_losses(sub, None if ref_all is None else ref_all[mb])

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One optimizer step on a batch of pairs (micro-batched; chosen and rejected in one forward)."""
        extra: dict[str, float] = {}
        if self.online:
            seqs, extra = self.online_batch(batch)
            if seqs is None:
                self.log_values("train", extra, len(batch["prompt"]))
                return
            ref_all = None
        else:
            seqs = self.batch_sequences(batch)
            ref_all = self.reference_logps(batch, "train") if self.reference_mode == "precomputed" else None
        logged = self.pair_values(seqs, self._losses(ref_all), train=True)
        del logged["logp_accuracy"]
        logged.update(extra)
        texts = self._online_texts if self.online else (batch["prompt"], batch["chosen"], batch["rejected"])
        self.record_pair_samples(*texts, logged["rewards/chosen"], logged["rewards/rejected"])
        self.log_values("train", logged, seqs.prompt_ids.shape[0] // 2,
                        prog_bar=("loss", "rewards/accuracy", "rewards/margins"))

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Held-out pairs: loss, implicit rewards, margins and accuracies (or, prompt-only, the mean greedy reward)."""
        if "chosen" not in batch:
            if self.rewards is None:
                raise KeyError("validation batches without 'chosen'/'rejected' need reward_funcs to score them")
            greedy = SamplingConfig(self.sampling.max_new_tokens, temperature=0.0)
            rollout = self.generate_rollout(batch["prompt"], sampling=greedy, num_generations=1)
            total, _, texts = self.score(batch["prompt"], rollout, self.columns_of(batch, ("prompt", "index")), 1)
            self.log_values("val", {"reward": total}, len(texts), prog_bar=("reward",))
            return
        seqs = self.batch_sequences(batch)
        ref_all = self.reference_logps(batch, "val") if self.reference_mode == "precomputed" else None
        values = self.pair_values(seqs, self._losses(ref_all), train=False)
        self.log_values("val", {k: v for k, v in values.items() if k in _VAL_METRICS}, seqs.prompt_ids.shape[0] // 2,
                        prog_bar=("rewards/accuracy", "rewards/margins"))
