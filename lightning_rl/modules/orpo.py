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
    """Odds Ratio Preference Optimization (Hong et al. 2024, arXiv:2403.07691, Section 4): no reference model.

    The loss per pair is the SFT negative log-likelihood (per token) of the chosen response plus
    ``beta`` times ``-log sigmoid(log odds(chosen) - log odds(rejected))``, where the odds come
    from length-normalized (per-token mean) log-probs. Chosen and rejected go through the
    policy in one forward.

    Args:
        beta: weight of the odds-ratio term (the paper's lambda; TRL's ``ORPOConfig.beta``).
        **kwargs: the :class:`~lightning_rl.modules.preference.PreferenceModule` arguments
            (``max_completion_length``, ``micro_batch_size`` in pairs; there is no ``reference``) and the
            :class:`~lightning_rl.modules.policy.PolicyModule` ones (``model``, ``lora``, ``learning_rate``, ...).
    """

    uses_reference = False

    def __init__(self, beta: float = 0.1, **kwargs: Any) -> None:
        if beta < 0:
            raise ValueError(f"beta (the odds-ratio weight) must be >= 0, got {beta}")
        if kwargs.get("reference", "auto") != "auto":
            raise ValueError("ORPO uses no reference model: leave reference out")
        super().__init__(**kwargs)
        self.beta = beta
        self.make_metrics(_METRICS + ("grad_norm",), _METRICS)

    @override
    def reference_targets(self, batch: Mapping[str, Any]) -> list[tuple[Sequence[Prompt], Sequence[Any]]]:
        return []

    def batch_sequences(self, batch: Mapping[str, Any]) -> Sequences:
        """Chosen rows then rejected rows of a batch of pairs."""
        return self.paired_sequences(batch, "use PreferenceDataModule(mode='paired')")

    def pair_losses(self, seqs: Sequences, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-pair ORPO pieces for ``seqs`` = chosen rows then rejected rows (``rows``: their pair indices, unused)."""
        n = seqs.prompt_ids.shape[0] // 2
        token_logp = self.token_logps(self.policy, seqs)
        mask = seqs.completion_mask
        mean = sequence_logp(token_logp, mask, average=True)
        out = orpo_loss(mean[:n], mean[n:], sft_nll(token_logp[:n], mask[:n]), self.beta)
        chosen_r, rejected_r = self.beta * mean[:n].detach(), self.beta * mean[n:].detach()
        return {"loss": out.loss, "nll": out.nll.detach(), "odds_ratio": out.odds_ratio.detach(),
                "log_odds_margin": out.log_odds_margin, "accuracy": out.accuracy,
                "logps/chosen": mean[:n].detach(), "logps/rejected": mean[n:].detach(),
                "rewards/chosen": chosen_r, "rewards/rejected": rejected_r, "rewards/margins": chosen_r - rejected_r}

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One optimizer step on a batch of pairs (micro-batched)."""
        seqs = self.batch_sequences(batch)
        logged = self.pair_values(seqs, self.pair_losses, train=True)
        self.record_pair_samples(batch["prompt"], batch["chosen"], batch["rejected"], logged["rewards/chosen"],
                                 logged["rewards/rejected"])
        self.log_values("train", logged, seqs.prompt_ids.shape[0] // 2, prog_bar=("loss", "accuracy"))

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Held-out pairs: loss, its parts, log-odds margin and accuracy."""
        seqs = self.batch_sequences(batch)
        values = self.pair_values(seqs, self.pair_losses, train=False)
        self.log_values("val", values, seqs.prompt_ids.shape[0] // 2, prog_bar=("accuracy",))
