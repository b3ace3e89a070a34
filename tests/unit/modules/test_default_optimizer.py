"""The default AdamW: fused on plain CUDA parameters outside AMP and FSDP, PyTorch's AdamW elsewhere."""

from types import SimpleNamespace

import torch
from torch import nn

from lightning_rl.modules.default_optimizer import default_adamw, fused_adamw_applies


def _param(device: str = "cuda", floating: bool = True, sharded: bool = False) -> SimpleNamespace:
    p = SimpleNamespace(device=torch.device(device), is_floating_point=lambda: floating)
    if sharded:
        p.placements = ()  # what FSDP2's DTensor parameters carry
    return p


def test_the_fused_kernel_applies_only_when_every_parameter_is_a_plain_floating_cuda_tensor():
    assert fused_adamw_applies([_param(), _param()])
    assert not fused_adamw_applies([])
    assert not fused_adamw_applies([_param(), _param("cpu")])
    assert not fused_adamw_applies([_param(), _param(floating=False)])
    assert not fused_adamw_applies([_param(), _param(sharded=True)])
    assert not fused_adamw_applies(nn.Linear(2, 2).parameters())


def test_lightnings_amp_and_fsdp_precision_keep_the_default_adamw():
    from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision

    from lightning_rl import MemoryAwarePrecision

    params = [_param(), _param()]
    # Lightning's AMP plugin refuses to clip the gradients of an optimizer that unscales them itself (a fused one)
    assert not fused_adamw_applies(params, MixedPrecision("bf16-mixed", "cuda"))
    assert not fused_adamw_applies(params, FSDPPrecision("bf16-mixed"))
    assert fused_adamw_applies(params, MemoryAwarePrecision())


def test_cpu_parameters_get_pytorchs_default_adamw_with_the_groups_settings_kept():
    torch.manual_seed(0)
    net, ref = nn.Linear(4, 3), nn.Linear(4, 3)
    ref.load_state_dict(net.state_dict())
    groups = [{"params": [net.weight]}, {"params": [net.bias], "lr": 0.5}]
    opt = default_adamw(groups, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([{"params": [ref.weight]}, {"params": [ref.bias], "lr": 0.5}], lr=1e-2,
                                weight_decay=0.1)
    assert not opt.defaults["fused"] and [g["lr"] for g in opt.param_groups] == [1e-2, 0.5]
    assert groups[1] == {"params": [net.bias], "lr": 0.5}  # the caller's groups are not filled in
    x = torch.randn(8, 4)
    for model, o in ((net, opt), (ref, ref_opt)):
        for _ in range(3):
            o.zero_grad()
            model(x).square().sum().backward()
            o.step()
    assert torch.equal(net.weight, ref.weight) and torch.equal(net.bias, ref.bias)
