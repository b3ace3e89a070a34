"""The memory-aware precision plugin for ``FSDPStrategy`` (which accepts only ``FSDPPrecision`` subclasses)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.precision import FSDPPrecision
from torch import nn
from typing_extensions import override

from lightning_rl.plugins.precision import MemoryAwarePrecision
from lightning_rl.plugins.weight_storage import DtypeName, Quantize


class MemoryAwareFSDPPrecision(MemoryAwarePrecision, FSDPPrecision):
    """:class:`MemoryAwarePrecision` for ``FSDPStrategy``.

    FSDP flattens the parameters of a wrapped unit into one tensor of one dtype, so frozen bf16 and
    trainable fp32 parameters cannot share a unit. By default this variant therefore leaves storage
    to FSDP (sharded fp32 masters, compute in bf16 through FSDP's ``MixedPrecision``) and keeps the
    rest: the memory plan (per rank: parameters are counted as sharded), optimizer offloading while
    the engine is awake, autocast-cache clearing and memory figures. With ``convert_frozen=True``
    frozen parameters are stored in the low dtype too; then wrap trainable and frozen parameters in
    separate FSDP units (e.g. LoRA layers in their own units) or use ``use_orig_params=True``.

    Args:
        convert_frozen: store frozen parameters in ``frozen_dtype`` (see above).
        **kwargs: the :class:`MemoryAwarePrecision` arguments.
    """

    def __init__(
        self,
        convert_frozen: bool = False,
        frozen_dtype: DtypeName = "auto",
        compute_dtype: DtypeName = "auto",
        quantize: Quantize | None = None,
        **kwargs: Any,
    ) -> None:
        if quantize is not None:
            raise ValueError("quantize is not supported with FSDP (bitsandbytes weights cannot be sharded this way); "
                             "use MemoryAwarePrecision on one GPU, or quantize=None")
        if kwargs.get("optimizer_states", "auto") not in ("auto", "device"):
            raise ValueError("optimizer_states='cpu' is not supported with FSDP (its flat sharded parameters are "
                             "stepped whole); use FSDPStrategy(cpu_offload=True) to keep optimizer states on the CPU")
        kwargs["optimizer_states"] = "device"  # "auto" never streams sharded states
        MemoryAwarePrecision.__init__(self, frozen_dtype=frozen_dtype, compute_dtype=compute_dtype, **kwargs)
        FSDPPrecision.__init__(self, self.precision)
        self.convert_frozen = convert_frozen

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Convert dtypes only with ``convert_frozen=True``; always install the autocast-cache hooks."""
        if self.convert_frozen:
            return MemoryAwarePrecision.convert_module(self, module)
        self._register_cache_hooks(module)
        return module

    @override
    def clip_grad_by_norm(self, *args: Any, **kwargs: Any) -> None:
        """As FSDPPrecision: norm clipping must go through the FSDP root module."""
        return FSDPPrecision.clip_grad_by_norm(self, *args, **kwargs)


__all__ = ["MemoryAwareFSDPPrecision"]
