"""Preference losses (DPO family, ORPO, KTO) as pure functions on per-sequence log-probs.

Every function takes per-sequence log-probabilities (``[B]`` tensors), never token tensors,
so the callers decide how tokens are aggregated (summed for DPO and KTO, length-normalized
for ORPO). References:

- DPO: Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, eq. 7.
- cDPO / label smoothing: Mitchell 2023, "A note on DPO with noisy preferences".
- robust DPO: Chowdhury et al. 2024, "Provably Robust DPO" (unbiased under label flips).
- IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", arXiv:2310.12036, Section 5: ``(h - 1/(2 tau))^2``.
- hinge (SLiC): Zhao et al. 2023, ``max(0, 1 - beta * h)``.
- ORPO: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
  arXiv:2403.07691, Section 4.
- KTO: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
  arXiv:2402.01306, Section 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust")


@dataclass
class PreferenceLoss:
    """Per-example loss and the implicit rewards behind it (rewards are detached).

    Attributes:
        loss: ``[B]`` loss per example (take ``.mean()`` for the batch loss).
        chosen_rewards: ``[B]`` implicit reward of the chosen (or desirable) responses.
        rejected_rewards: ``[B]`` implicit reward of the rejected (or undesirable) responses.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        """``chosen_rewards - rejected_rewards``."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> torch.Tensor:
        """``[B]`` float, 1 where the chosen reward is strictly higher."""
        return (self.chosen_rewards > self.rejected_rewards).float()


def check_dpo_settings(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Refuse DPO settings outside their domain, naming the fix."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to the sigmoid and robust losses, not {loss_type!r}; set it to 0")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO-family loss per pair from sequence log-probs of the policy and the reference.

    With ``h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)``:

    - ``sigmoid``: ``-(1 - eps) log s(beta h) - eps log s(-beta h)`` (eps = label smoothing, cDPO).
    - ``robust``: ``(-(1 - eps) log s(beta h) + eps log s(-beta h)) / (1 - 2 eps)``.
    - ``hinge``: ``max(0, 1 - beta h)``.
    - ``ipo``: ``(h - 1 / (2 beta))^2``.

    Args:
        policy_chosen: ``[B]`` log-probs of the chosen responses under the policy.
        policy_rejected: ``[B]`` same for the rejected responses.
        ref_chosen: ``[B]`` log-probs of the chosen responses under the reference.
        ref_rejected: ``[B]`` same for the rejected responses.
        beta: inverse temperature (IPO's ``tau``).
        loss_type: ``sigmoid``, ``ipo``, ``hinge`` or ``robust``.
        label_smoothing: assumed probability that a label is flipped (``sigmoid``/``robust``), in [0, 0.5).
    """
    check_dpo_settings(beta, loss_type, label_smoothing)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    logits = beta * h
    eps = label_smoothing
    if loss_type == "sigmoid":
        loss = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    elif loss_type == "robust":
        loss = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = torch.relu(1 - logits)
    else:
        loss = (h - 1 / (2 * beta)) ** 2
    return PreferenceLoss(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def sft_nll(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` negative log-likelihood per token of each sequence (mean over its real tokens)."""
    mask = mask.to(token_logp.dtype)
    return -(token_logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def sequence_logp(token_logp: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """``[B]`` summed (or, with ``average``, length-normalized) log-prob of each sequence."""
    mask = mask.to(token_logp.dtype)
    total = (token_logp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` from ``log p`` (a length-normalized log-prob, < 0), computed stably."""
    # log(1 - p) = log(-expm1(log p)); clamp keeps p = 1 (log p = 0) finite
    return mean_logp - torch.log(-torch.expm1(mean_logp.clamp(max=-1e-6)))


@dataclass
class ORPOLoss:
    """ORPO per pair: the total and its parts.

    Attributes:
        loss: ``[B]`` ``nll + beta * odds_ratio``.
        nll: ``[B]`` SFT negative log-likelihood of the chosen response (per token).
        odds_ratio: ``[B]`` ``-log sigmoid(log_odds_chosen - log_odds_rejected)``.
        log_odds_margin: ``[B]`` ``log_odds_chosen - log_odds_rejected`` (detached).
    """

    loss: torch.Tensor
    nll: torch.Tensor
    odds_ratio: torch.Tensor
    log_odds_margin: torch.Tensor

    @property
    def accuracy(self) -> torch.Tensor:
        """``[B]`` float, 1 where the chosen response has the higher odds."""
        return (self.log_odds_margin > 0).float()


def orpo_loss(chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, chosen_nll: torch.Tensor,
              beta: float = 0.1) -> ORPOLoss:
    """ORPO: ``L_SFT + beta * L_OR`` with ``L_OR = -log sigmoid(log odds(y_w) - log odds(y_l))``.

    Args:
        chosen_mean_logp: ``[B]`` length-normalized log-prob of the chosen responses.
        rejected_mean_logp: ``[B]`` same for the rejected responses.
        chosen_nll: ``[B]`` SFT negative log-likelihood of the chosen responses.
        beta: weight of the odds-ratio term (the paper's lambda; TRL's name).
    """
    if beta < 0:
        raise ValueError(f"beta (the odds-ratio weight) must be >= 0, got {beta}")
    margin = log_odds(chosen_mean_logp) - log_odds(rejected_mean_logp)
    odds_ratio = -F.logsigmoid(margin)
    return ORPOLoss(chosen_nll + beta * odds_ratio, chosen_nll, odds_ratio, margin.detach())


def kto_kl_estimate(policy_kl_logp: torch.Tensor, ref_kl_logp: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))`` over mismatched pairs.

    Always detached: the paper does not back-propagate through ``z0``.
    """
    return (policy_kl_logp - ref_kl_logp).detach().mean().clamp(min=0)


def kto_loss(
    policy_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO loss per example: ``w_D (1 - s(beta (r - z0)))`` or ``w_U (1 - s(beta (z0 - r)))``.

    Args:
        policy_logp: ``[B]`` summed log-probs of the completions under the policy.
        ref_logp: ``[B]`` same under the reference.
        desirable: ``[B]`` bool, True for desirable completions.
        kl: the reference point ``z0`` (a scalar; detached here whatever is passed).
        beta: inverse temperature.
        desirable_weight: ``lambda_D``.
        undesirable_weight: ``lambda_U``.

    Returns:
        ``(loss [B], rewards [B])`` with ``rewards = beta * (policy_logp - ref_logp)`` detached.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"desirable_weight and undesirable_weight must be >= 0, got "
                         f"{desirable_weight} and {undesirable_weight}")
    ratio = policy_logp - ref_logp
    z0 = kl.detach()
    desirable = desirable.bool()
    loss = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))),
    )
    return loss, beta * ratio.detach()


def kto_weight_advice(num_desirable: int, num_undesirable: int, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0) -> str | None:
    """Check KTO's class balance; raise when a class is missing, return a warning text when off-balance.

    The KTO paper recommends ``w_D n_D / (w_U n_U)`` in ``[1, 4/3]``.

    Raises:
        ValueError: no desirable or no undesirable examples.
    """
    if num_desirable == 0 or num_undesirable == 0:
        have, missing = ("desirable", "undesirable") if num_undesirable == 0 else ("undesirable", "desirable")
        raise ValueError(
            f"KTO got {num_desirable} desirable and {num_undesirable} undesirable examples: with no {missing} "
            f"examples the loss only pushes {have} rewards against a reference point and no weights "
            f"(desirable_weight / undesirable_weight) can balance it. Add {missing} examples (label=false for "
            "undesirable), or train the desirable ones with plain SFT."
        )
    ratio = desirable_weight * num_desirable / (undesirable_weight * num_undesirable)
    if 1.0 <= ratio <= 4 / 3:
        return None
    suggested = desirable_weight * num_desirable / (1.0 * num_undesirable)  # undesirable_weight giving ratio 1
    if ratio < 1:
        suggested_text = f"undesirable_weight={suggested:.3g} (with desirable_weight={desirable_weight:g})"
    else:
        w_d = undesirable_weight * num_undesirable / num_desirable * (7 / 6)
        suggested_text = f"desirable_weight={w_d:.3g} (with undesirable_weight={undesirable_weight:g})"
    return (
        f"KTO class balance: {num_desirable} desirable x desirable_weight={desirable_weight:g} vs "
        f"{num_undesirable} undesirable x undesirable_weight={undesirable_weight:g} gives a ratio of {ratio:.3g}; "
        f"the KTO paper recommends 1 to 4/3. Try {suggested_text}."
    )
