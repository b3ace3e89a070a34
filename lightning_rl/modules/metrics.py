"""Logged step values: one MeanMetric per name, train and val, kept in host memory in a single process."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import MeanMetric
from typing_extensions import override


def several_processes() -> bool:
    """Whether metric states are synced at epoch end: only in a process group of more than one process.

    torchmetrics syncs whenever ``torch.distributed`` is initialised. A single-GPU run with a vLLM engine has a
    one-process group (vLLM starts it), and a sync there only builds an NCCL communicator (device memory that
    stays taken) to exchange nothing.
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class HostMetrics(nn.ModuleDict):
    """Metrics that stay in host memory when their module moves to a GPU or changes dtype, in a single process.

    The values they take are host floats already (:class:`~lightning_rl.modules.step_stats.StepStats` reads a step's
    statistics back once). On a GPU every update of a metric was a copy to the device, a NaN check that waits for the
    device (torchmetrics reads ``isnan(x).any()``) and a few small kernels: about 40 of each a GRPO step, while the
    rollout engine generates the next step's completions on the same GPU. Lightning logs a metric where it lives.
    Under DDP/FSDP (:func:`several_processes`) they move with the module, since torchmetrics syncs their states over
    the process group (NCCL takes device tensors).
    """

    @override
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> HostMetrics:
        if several_processes():
            return super()._apply(fn, recurse)
        return self


class StepMetrics:
    """Mixed into :class:`~lightning_rl.modules.policy.PolicyModule`: ``train/<name>`` and ``val/<name>`` metrics."""

    def make_metrics(self, train: Sequence[str], val: Sequence[str]) -> None:
        """Create the MeanMetric accumulators for the logged values."""
        self.train_metrics = HostMetrics(
            {metric_key(n): MeanMetric(nan_strategy="ignore", distributed_available_fn=several_processes)
             for n in train})
        self.val_metrics = HostMetrics(
            {metric_key(n): MeanMetric(distributed_available_fn=several_processes) for n in val})

    def log_values(
        self, stage: str, values: Mapping[str, float | torch.Tensor], batch_size: int, prog_bar: Sequence[str] = ()
    ) -> None:
        """Update and log ``<stage>/<name>`` metrics (``stage`` is train or val; NaN values are left out of means).

        A training step's NaN value (the ``grad_norm`` and ``loss`` of a skipped optimizer step, the ``reward`` of
        a step no completion was scored in) is logged as NaN for that step and left out of the epoch mean, so
        loggers, the progress bar and the report show the gap instead of the previous step's value.
        """
        metrics = self.train_metrics if stage == "train" else self.val_metrics
        for name, value in values.items():
            v = value.detach().float().flatten() if isinstance(value, torch.Tensor) else torch.tensor([float(value)])
            v = v[~torch.isnan(v)]
            if not v.numel():
                if stage != "train":
                    continue
                v = torch.tensor([math.nan])
            metric = metrics[metric_key(name)]
            if not torch.is_inference_mode_enabled() and any(
                    isinstance(t, torch.Tensor) and t.is_inference() for t in metric.metric_state.values()):
                metric.reset()  # states last reset under inference mode (a previous Trainer.validate)
            metric(v.to(metric.device))
            self.log(f"{stage}/{name}", metric, on_step=stage == "train", on_epoch=True, batch_size=batch_size,
                     prog_bar=name in prog_bar)


def metric_key(name: str) -> str:
    """ModuleDict key of a metric name (keys may not contain dots or slashes)."""
    return name.replace("/", "__").replace(".", "_")
