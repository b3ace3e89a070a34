"""KTO: Kahneman-Tversky optimization on unpaired binary feedback (desirable / undesirable completions)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from typing_extensions import override

from lightning_rl.algorithms.preference_losses import kto_kl_estimate, kto_loss, kto_weight_advice
from lightning_rl.modules.preference import PreferenceModule, Sequences
from lightning_rl.prompting import Prompt
from lightning_rl.samples import StepSamples

_METRICS = ("loss", "kl", "rewards/desirable", "rewards/undesirable", "logps/desirable", "logps/undesirable")


class KTO(PreferenceModule):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306, Section 4).

    Each row is a prompt, a completion and a label (true = desirable). With the implicit reward
    ``r = log pi(y|x) - log pi_ref(y|x)`` and the reference point ``z0`` (a detached, clamped
    estimate of KL(pi || pi_ref) from mismatched prompt/completion pairs: each row's prompt with
    another row's completion, the ``kl_completion`` column of
    :class:`~lightning_rl.data.PreferenceDataModule` in ``unpaired`` mode), the loss is
    ``w_D (1 - sigmoid(beta (r - z0)))`` for desirable and ``w_U (1 - sigmoid(beta (z0 - r)))``
    for undesirable rows. At the start of fit the class balance is checked: a missing class
    raises, and a ratio ``w_D n_D / (w_U n_U)`` outside the paper's ``[1, 4/3]`` warns with weights to use.

    Args:
        beta: inverse temperature.
        desirable_weight: ``lambda_D``.
        undesirable_weight: ``lambda_U``.
        **kwargs: the :class:`~lightning_rl.modules.preference.PreferenceModule` arguments (``reference``,
            ``max_completion_length``, ``micro_batch_size`` in rows) and the
            :class:`~lightning_rl.modules.policy.PolicyModule` ones (``model``, ``lora``, ``learning_rate``, ...).
    """

    sequences_per_example = 1  # one labelled completion per row

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 **kwargs: Any) -> None:
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if desirable_weight < 0 or undesirable_weight < 0:
            raise ValueError(f"desirable_weight and undesirable_weight must be >= 0, got {desirable_weight} and "
                             f"{undesirable_weight}")
        super().__init__(**kwargs)
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.make_metrics(_METRICS + ("grad_norm",), _METRICS)

    @override
    def reference_targets(self, batch: Mapping[str, Any]) -> list[tuple[Sequence[Prompt], Sequence[Any]]]:
        self._check_batch(batch)
        return [(batch["prompt"], batch["completion"]), (batch["prompt"], batch["kl_completion"])]

    @override
    def check_batch(self, batch: Mapping[str, Any]) -> None:
        self._check_batch(batch)

    @staticmethod
    def _check_batch(batch: Mapping[str, Any]) -> None:
        for col in ("completion", "label", "kl_completion"):
            if col not in batch:
                raise KeyError(f"KTO needs unpaired rows with a {col!r} column (got columns {sorted(batch)}); use "
                               "PreferenceDataModule(mode='unpaired'), which also splits paired rows")

    def check_balance(self, num_desirable: int, num_undesirable: int) -> None:
        """Raise when a class is missing; warn with the weights to use when the balance is off."""
        advice = kto_weight_advice(num_desirable, num_undesirable, self.desirable_weight, self.undesirable_weight)
        if advice:
            warnings.warn(advice, UserWarning, stacklevel=2)

    @override
    def on_fit_start(self) -> None:
        """Check the class balance of the datamodule's rows, then prepare the reference."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "mode", "unpaired") != "unpaired":
            raise ValueError("KTO trains on unpaired rows (prompt, completion, label): use "
                             "PreferenceDataModule(mode='unpaired'), which also splits paired rows into one "
                             "desirable and one undesirable row")
        if dm is not None and hasattr(dm, "label_counts"):
            self.check_balance(*dm.label_counts())
        super().on_fit_start()

    def _kl(self, batch: Mapping[str, Any], ref: torch.Tensor) -> torch.Tensor:
        """The detached reference point ``z0`` from the batch's mismatched pairs (averaged over ranks)."""
        kl_seqs = self.tokenize(list(batch["prompt"]), list(batch["kl_completion"]))
        with torch.no_grad():
            policy_kl = torch.cat([self.summed_logps(self.policy, kl_seqs.rows(mb))
                                   for mb in self.micro_batches(kl_seqs.prompt_ids.shape[0])])
        diff = (policy_kl - ref[:, 1]).mean()
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            diff = self.trainer.strategy.reduce(diff, reduce_op="mean")
        return kto_kl_estimate(diff.reshape(1), torch.zeros(1, device=diff.device))

    def row_losses(self, seqs: Sequences, ref: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor):
        """``(loss [m], rewards [m], logps [m])`` of the completion rows ``seqs``."""
        logp = self.summed_logps(self.policy, seqs)
        loss, rewards = kto_loss(logp, ref, desirable, z0, self.beta, self.desirable_weight, self.undesirable_weight)
        return loss, rewards, logp.detach()

    def _step(self, batch: Mapping[str, Any], split: str, train: bool) -> dict[str, Any]:
        self._check_batch(batch)
        seqs = self.tokenize(list(batch["prompt"]), list(batch["completion"]))
        ref = self.reference_logps(batch, split)
        z0 = self._kl(batch, ref)
        desirable = torch.tensor([bool(x) for x in batch["label"]], device=self.device)
        n = len(desirable)
        losses, rewards, logps = [], [], []
        for mb in self.micro_batches(n):
            loss, r, lp = self.row_losses(seqs.rows(mb), ref[mb, 0], desirable[mb], z0)
            if train:
                self.manual_backward(loss.sum() / n)
            losses.append(loss.detach())
            rewards.append(r)
            logps.append(lp)
        loss, r, lp = torch.cat(losses), torch.cat(rewards), torch.cat(logps)
        if train:
            self.last_samples = StepSamples({"prompt": list(batch["prompt"]), "completion": list(batch["completion"]),
                                             "label": desirable.tolist(), "reward": r})
        return {"loss": loss, "kl": z0, "rewards/desirable": r[desirable], "rewards/undesirable": r[~desirable],
                "logps/desirable": lp[desirable], "logps/undesirable": lp[~desirable]}

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One optimizer step on a batch of labelled completions (micro-batched)."""
        values = self._step(batch, "train", train=True)
        result = self.optimizer_step_checked(values["loss"].mean())
        values["grad_norm"] = result["grad_norm"]
        self.log_values("train", values, len(batch["prompt"]), prog_bar=("loss", "kl"))

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Held-out rows: loss, rewards of desirable and undesirable completions, KL estimate."""
        self.log_values("val", self._step(batch, "val", train=False), len(batch["prompt"]))
