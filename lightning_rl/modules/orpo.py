"""ORPO: odds-ratio preference optimization, reference-free (SFT on chosen + odds-ratio term)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from typing_extensions import override

from lightning_rl.algorithms.preference_losses import orpo_loss, sequence_logp, sft_nll
from lightning_rl.modules.preference import PreferenceModule, Sequences
from lightning_rl.prompting import Prompt

_METRICS = ("loss", "nll", "odds_ratio", "log_odds_margin", "accuracy", "logps/chosen", "logps/rejected",
            "rewards/chosen", "rewards/rejected", "rewards/margins")


class ORPO(PreferenceModule):
    """Odds Ratio Preference Optimization (Hong et al. 2024): no reference model at all.

    The loss per pair is the SFT negative log-likelihood (per token) of the chosen response plus
    ``lam`` times ``-log sigmoid(log odds(chosen) - log odds(rejected))``, where the odds come
    from length-normalized (per-token mean) log-probs. Chosen and rejected go through the
    policy in one forward.

    Args:
        lam: weight of the odds-ratio term (the paper's lambda; TRL calls it beta).
        max_completion_length: keep at most this many tokens of each response.
        micro_batch_size: pairs per forward/backward.
        **kwargs: :class:`~lightning_rl.modules.policy.PolicyModule` arguments (model, lora, learning_rate, ...).
    """

    uses_reference = False

    def __init__(
        self,
        lam: float = 0.1,
        max_completion_length: int | None = 512,
        micro_batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_completion_length=max_completion_length, micro_batch_size=micro_batch_size, **kwargs)
        if lam < 0:
            raise ValueError(f"lam (the odds-ratio weight) must be >= 0, got {lam}")
        self.save_hyperparameters()
        self.lam = lam
        self.make_metrics(_METRICS + ("grad_norm",), _METRICS)

    @override
    def reference_targets(self, batch: Mapping[str, Any]) -> list[tuple[Sequence[Prompt], Sequence[Any]]]:
        return []

    def batch_sequences(self, batch: Mapping[str, Any]) -> Sequences:
        """Chosen rows then rejected rows of a batch of pairs."""
        return self.paired_sequences(batch, "use PreferenceDataModule(mode='paired')")

    def pair_losses(self, seqs: Sequences) -> dict[str, torch.Tensor]:
        """Per-pair ORPO pieces for ``seqs`` = chosen rows then rejected rows."""
        n = seqs.prompt_ids.shape[0] // 2
        token_logp = self.token_logps(self.policy, seqs)
        mask = seqs.completion_mask
        mean = sequence_logp(token_logp, mask, average=True)
        out = orpo_loss(mean[:n], mean[n:], sft_nll(token_logp[:n], mask[:n]), self.lam)
        chosen_r, rejected_r = self.lam * mean[:n].detach(), self.lam * mean[n:].detach()
        return {"loss": out.loss, "nll": out.nll.detach(), "odds_ratio": out.odds_ratio.detach(),
                "log_odds_margin": out.log_odds_margin, "accuracy": out.accuracy,
                "logps/chosen": mean[:n].detach(), "logps/rejected": mean[n:].detach(),
                "rewards/chosen": chosen_r, "rewards/rejected": rejected_r, "rewards/margins": chosen_r - rejected_r}

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One optimizer step on a batch of pairs (micro-batched)."""
        seqs = self.batch_sequences(batch)
        n = seqs.prompt_ids.shape[0] // 2
        values: dict[str, list[torch.Tensor]] = {}
        step_loss = 0.0
        for mb in self.micro_batches(n):
            parts = self.pair_losses(seqs.rows(torch.cat([mb, mb + n])))
            loss = parts["loss"].sum() / n
            self.manual_backward(loss)
            step_loss += loss.item()
            for k, v in parts.items():
                values.setdefault(k, []).append(v.detach())
        result = self.optimizer_step_checked(step_loss)
        logged = {k: torch.cat(v) for k, v in values.items()}
        logged["grad_norm"] = result["grad_norm"]
        self.record_pair_samples(batch["prompt"], batch["chosen"], batch["rejected"], logged["rewards/chosen"],
                                 logged["rewards/rejected"])
        self.log_values("train", logged, n, prog_bar=("loss", "accuracy"))

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Held-out pairs: loss, its parts, log-odds margin and accuracy."""
        seqs = self.batch_sequences(batch)
        n = seqs.prompt_ids.shape[0] // 2
        values: dict[str, list[torch.Tensor]] = {}
        for mb in self.micro_batches(n):
            for k, v in self.pair_losses(seqs.rows(torch.cat([mb, mb + n]))).items():
                values.setdefault(k, []).append(v.detach())
        self.log_values("val", {k: torch.cat(v) for k, v in values.items()}, n, prog_bar=("accuracy",))
