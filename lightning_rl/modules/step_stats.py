"""Statistics of one training step, kept on the device and read back to the host once."""

from __future__ import annotations

from collections import defaultdict

import torch


class StepStats:
    """Collects a step's statistics as tensors; :meth:`read` turns them into floats with one synchronization.

    Reading a device tensor (``.item()``, ``float()``) waits for the device, so a step that read its
    statistics per micro-batch would stall the GPU each time. Values are collected as they come, in
    five kinds, and all of them are reduced on the device and copied back together.
    """

    def __init__(self) -> None:
        self._means: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._ratios: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self._token_means: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self._maxima: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._values: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        """One more value of ``name``; the step logs their mean (e.g. one per micro-batch)."""
        self._means[name].append(torch.as_tensor(value))

    def add_ratio(self, name: str, numerator: torch.Tensor, denominator: torch.Tensor) -> None:
        """Sums of ``name``'s numerator and denominator; the step logs ``sum(numerators) / sum(denominators)``, NaN
        when the denominators sum to 0 (as a token mean over no token: a gap in the log, left out of epoch means).
        """
        self._ratios[name].append((numerator, denominator))

    def add_token_mean(self, name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        """``values`` at the tokens ``mask`` counts; the step logs their mean over every token counted in the step.

        Unlike :meth:`add` of a per-micro-batch mean, micro-batches weigh by their tokens, so the logged value does
        not depend on how the step was split; a step that counted no token logs NaN.
        """
        m = mask.float()
        self._token_means[name].append(((values.float() * m).sum(), m.sum()))

    def add_max(self, name: str, value: torch.Tensor) -> None:
        """One more value of ``name``; the step logs their maximum."""
        self._maxima[name].append(value)

    def set(self, name: str, value: torch.Tensor | float) -> None:
        """The step's single value of ``name``."""
        self._values[name] = torch.as_tensor(value)

    def __contains__(self, name: str) -> bool:
        return any(name in d for d in (self._means, self._ratios, self._token_means, self._maxima, self._values))

    def reduced(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Every statistic reduced to a float32 scalar on ``device`` (nothing is read back)."""

        def on(t: torch.Tensor) -> torch.Tensor:
            return t.float().to(device)

        out = {k: torch.stack([on(v) for v in vs]).mean() for k, vs in self._means.items() if vs}
        for k, pairs in (*self._ratios.items(), *self._token_means.items()):
            num, den = torch.stack([on(n) for n, _ in pairs]).sum(), torch.stack([on(d) for _, d in pairs]).sum()
            out[k] = torch.where(den > 0, num / den.clamp(min=1e-12), torch.full_like(num, float("nan")))
        out.update({k: torch.stack([on(v) for v in vs]).max() for k, vs in self._maxima.items() if vs})
        out.update({k: on(v).reshape(()) for k, v in self._values.items()})
        return out

    def read(self, device: torch.device | str) -> dict[str, float]:
        """Every statistic as a float, from one copy to the host."""
        values = self.reduced(device)
        if not values:
            return {}
        return dict(zip(values, torch.stack(list(values.values())).tolist()))
