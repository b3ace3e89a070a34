"""DPO: direct preference optimization, offline (preference pairs) or online (pairs ranked by rewards)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from typing_extensions import override

from lightning_rl.algorithms.preference_losses import DPOLossType, check_dpo_settings, dpo_loss, sft_nll
from lightning_rl.modules.preference import PreferenceModule, ReferenceMode, Sequences
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
    """Direct Preference Optimization (Rafailov et al. 2023) and its IPO / hinge / robust variants.

    Offline, each batch holds preference pairs (``prompt``, ``chosen``, ``rejected``) from a
    :class:`~lightning_rl.data.PreferenceDataModule`. Online (``online=True``), each batch holds
    prompts: the rollout engine samples two completions per prompt, the reward functions rank
    them, and the better one is the chosen response (ties are left out). Chosen and rejected go
    through the policy in one forward.

    Args:
        beta: inverse temperature of the implicit reward (IPO's ``tau``).
        loss_type: ``sigmoid`` (DPO), ``ipo``, ``hinge`` (SLiC) or ``robust``.
        label_smoothing: assumed label-flip probability for ``sigmoid`` (cDPO) and ``robust``.
        sft_weight: weight of an added SFT term (NLL per token of the chosen response, as in RPO).
        reference: ``auto``, ``live`` or ``precomputed`` (see :class:`PreferenceModule`).
        online: generate the pairs with the rollout engine and rank them with ``reward_funcs``.
        reward_funcs: reward callables ``f(prompts, completions, **columns)`` for online mode.
        reward_weights: weight of each reward function.
        max_new_tokens: generation limit in online mode.
        temperature: sampling temperature in online mode (> 0).
        top_p: nucleus sampling threshold in online mode.
        top_k: top-k sampling in online mode.
        generation_batch_size: sequences per ``generate`` call of the default engine.
        max_completion_length: keep at most this many tokens of each offline response.
        micro_batch_size: pairs per forward/backward.
        **kwargs: :class:`~lightning_rl.modules.policy.PolicyModule` arguments (model, lora, learning_rate, ...).
    """

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
        reference: ReferenceMode = "auto",
        online: bool = False,
        reward_funcs: Sequence[Callable[..., Any]] | None = None,
        reward_weights: Sequence[float] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        generation_batch_size: int = 64,
        max_completion_length: int | None = 512,
        micro_batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(reference=reference, max_completion_length=max_completion_length,
                         micro_batch_size=micro_batch_size, **kwargs)
        check_dpo_settings(beta, loss_type, label_smoothing)
        if sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
        if online and not reward_funcs:
            raise ValueError("online DPO ranks its two completions per prompt with reward functions: give "
                             "reward_funcs=[...]")
        if online and reference == "precomputed":
            raise ValueError("online DPO generates new responses every step, so their reference log-probs cannot "
                             "be precomputed: use reference='live' (or 'auto')")
        if online and temperature <= 0:
            raise ValueError(f"online DPO needs two different samples per prompt: temperature must be > 0, "
                             f"got {temperature}")
        self.save_hyperparameters()
        self.beta, self.loss_type, self.label_smoothing, self.sft_weight = beta, loss_type, label_smoothing, sft_weight
        self.is_online = online
        self.rewards = RewardSet(reward_funcs, reward_weights) if reward_funcs else None
        self.sampling = SamplingConfig(max_new_tokens, temperature, top_p, top_k)
        self.num_generations = 2  # completions per prompt in online mode (read by rollout callbacks)
        self.generation_batch_size = generation_batch_size
        self.make_metrics(_TRAIN_METRICS, _VAL_METRICS)

    @property
    @override
    def online(self) -> bool:
        return self.is_online

    @override
    def reference_targets(self, batch: Mapping[str, Any]) -> list[tuple[Sequence[Prompt], Sequence[Any]]]:
        return [(batch["prompt"], batch["chosen"]), (batch["prompt"], batch["rejected"])]

    # ----------------------------------------------------------------------------- online pairs
    def online_batch(self, batch: Mapping[str, Any]) -> tuple[Sequences | None, dict[str, float]]:
        """Two completions per prompt, ranked by the rewards: ``(chosen rows then rejected rows, stats)``."""
        prompts = batch["prompt"]
        t0 = time.perf_counter()
        rollout: Rollout | None = batch.get("rollout")
        if rollout is None:
            rollout = self.default_engine().generate(self.encode(prompts), self.sampling, 2)
        rollout = rollout.to(self.device)
        if rollout.num_sequences != 2 * len(prompts):
            raise ValueError(f"online DPO needs 2 completions per prompt; the rollout has {rollout.num_sequences} "
                             f"for {len(prompts)} prompts")
        rollout_time = time.perf_counter() - t0
        ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, self.tokenizer.pad_token_id)
        completions = self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
        columns = {k: [v for v in vals for _ in range(2)] for k, vals in self.columns_of(batch, ("prompt", "rollout",
                   "chosen", "rejected", "index")).items()}
        total, per_fn = self.rewards([p for p in prompts for _ in range(2)], completions, columns)
        self.health.check_rewards(total, per_fn, self.rewards.names, self.global_step)
        rewards = total.view(-1, 2)
        chosen_col, valid = online_pairs(rewards)
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
        n = seqs.prompt_ids.shape[0] // 2
        values: dict[str, list[torch.Tensor]] = {}
        step_loss = 0.0
        for mb in self.micro_batches(n):
            sub = seqs.rows(torch.cat([mb, mb + n]))
            parts = self.pair_losses(sub, None if ref_all is None else ref_all[mb])
            loss = parts["loss"].sum() / n
            self.manual_backward(loss)
            step_loss += loss.item()
            for k, v in parts.items():
                values.setdefault(k, []).append(v.detach())
        result = self.optimizer_step_checked(step_loss)
        logged = {k: torch.cat(v) for k, v in values.items() if k != "logp_accuracy"}
        logged.update(extra, grad_norm=result["grad_norm"])
        texts = self._online_texts if self.online else (batch["prompt"], batch["chosen"], batch["rejected"])
        self.record_pair_samples(*texts, logged["rewards/chosen"], logged["rewards/rejected"])
        self.log_values("train", logged, n, prog_bar=("loss", "rewards/accuracy", "rewards/margins"))

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Held-out pairs: loss, implicit rewards, margins and accuracies (or, prompt-only, the mean reward)."""
        if "chosen" not in batch:
            if self.rewards is None:
                raise KeyError("validation batches without 'chosen'/'rejected' need reward_funcs to score them")
            rollout = self.default_engine().generate(self.encode(batch["prompt"]), SamplingConfig(
                self.sampling.max_new_tokens, temperature=0.0), 1)
            ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, self.tokenizer.pad_token_id)
            texts = self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
            total, _ = self.rewards(batch["prompt"], texts, self.columns_of(batch, ("prompt", "index")))
            self.log_values("val", {"reward": total}, len(texts), prog_bar=("reward",))
            return
        seqs = self.batch_sequences(batch)
        ref_all = self.reference_logps(batch, "val") if self.reference_mode == "precomputed" else None
        n = seqs.prompt_ids.shape[0] // 2
        values: dict[str, list[torch.Tensor]] = {}
        for mb in self.micro_batches(n):
            parts = self.pair_losses(seqs.rows(torch.cat([mb, mb + n])), None if ref_all is None else ref_all[mb])
            for k in _VAL_METRICS:
                if k in parts:
                    values.setdefault(k, []).append(parts[k].detach())
        self.log_values("val", {k: torch.cat(v) for k, v in values.items()}, n,
                        prog_bar=("rewards/accuracy", "rewards/margins"))
