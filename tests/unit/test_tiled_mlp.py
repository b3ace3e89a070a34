"""MLPs sliced over the tokens in the update: the same outputs and gradients as the whole MLP (float64 and under
bf16 autocast, full fine-tune and LoRA, checkpointed and compiled layers), only the input kept for the backward,
one gradient per parameter for the hooks, and the plain MLP outside the update."""

import pytest
import torch
from torch import nn

from lightning_rl.compiled_layers import compile_decoder_layers
from lightning_rl.lora import apply_lora
from lightning_rl.models import enable_activation_checkpointing
from lightning_rl.tiled_mlp import (
    TiledMLPFunction,
    check_tiling,
    is_tiled,
    mlp_slices,
    tile_decoder_mlps,
    tiled_mlp_count,
    tiling_unsupported_reason,
)


@pytest.fixture
def saved_policy(tiny_llama_loader):
    """Loads a 2-layer tiny-llama (hidden 64, intermediate 128) saved to a folder, as users load models."""
    return tiny_llama_loader(2)


def _loss_and_grads(model, ids, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, use_cache=False).logits.float()
    loss = logits.square().mean()
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_slices_make_one_slices_intermediate_about_the_size_of_the_layer_input():
    assert mlp_slices(896, 4864) == 6  # Qwen2.5-0.5B
    assert mlp_slices(576, 1536) == 3  # SmolLM2-135M
    assert mlp_slices(64, 128) == 2
    assert mlp_slices(64, 64) == 1 and mlp_slices(64, None) == 1


def test_the_function_matches_the_whole_mlp_in_float64_for_the_input_and_every_parameter():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 24), nn.SiLU(), nn.Linear(24, 8)).double()
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 7, 8, dtype=torch.float64)
    whole = mlp(x)
    expected = torch.autograd.grad(whole, [x, *mlp.parameters()], grad)
    x2 = x.detach().clone().requires_grad_()
    sliced = TiledMLPFunction.apply(mlp, 4, x2, *mlp.parameters())
    got = torch.autograd.grad(sliced, [x2, *mlp.parameters()], grad)
    torch.testing.assert_close(sliced, whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_only_the_input_is_kept_for_the_backward_and_each_parameter_gets_one_gradient():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 64), nn.SiLU(), nn.Linear(64, 16))
    x = torch.randn(40, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    hooks = {id(p): 0 for p in mlp.parameters()}
    for p in mlp.parameters():
        p.register_post_accumulate_grad_hook(lambda p: hooks.__setitem__(id(p), hooks[id(p)] + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = TiledMLPFunction.apply(mlp, 4, x, *mlp.parameters())
    assert saved == [(40, 16)]  # the whole MLP would keep its [40, 64] intermediates too
    out.sum().backward()
    assert set(hooks.values()) == {1}
    whole = nn.Sequential(*mlp)  # same parameters
    xr = x.detach().clone().requires_grad_()
    expected = torch.autograd.grad(whole(xr).sum(), [xr, *mlp.parameters()])
    got = [x.grad, *(p.grad for p in mlp.parameters())]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_tiled_policy_trains_as_the_whole_one_checkpointed_and_under_bf16_autocast(saved_policy, lora):
    spec = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"} if lora else None
    models = []
    for _ in range(2):
        torch.manual_seed(0)  # the same adapters in both
        models.append(apply_lora(saved_policy(), spec))
    whole, tiled = models
    if lora:  # B starts at zero: give the adapters something to say
        for w in (whole, tiled):
            for n, p in w.named_parameters():
                if "lora_B" in n:
                    with torch.no_grad():
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    for m in (whole, tiled):
        enable_activation_checkpointing(m)
        m.train()
    assert tile_decoder_mlps(tiled) == 2
    assert tile_decoder_mlps(tiled) == 2 and tiled_mlp_count(tiled) == 2  # idempotent
    ids = torch.randint(0, whole.config.vocab_size, (3, 13))
    for autocast, tol in ((False, 1e-5), (True, 2e-2)):
        (lw, gw), (lt, gt) = _loss_and_grads(whole, ids, autocast), _loss_and_grads(tiled, ids, autocast)
        torch.testing.assert_close(lt, lw, rtol=tol, atol=tol)
        assert gt.keys() == gw.keys() and len(gt) > 0
        assert any("mlp" in n for n in gt)
        if lora:
            assert all("lora_" in n for n in gt)
        for n in gw:
            torch.testing.assert_close(gt[n], gw[n], rtol=tol, atol=tol * max(1.0, gw[n].abs().max().item()))


@pytest.mark.parametrize("offload", [False, True], ids=["kept", "offloaded"])
def test_compiled_layers_with_tiled_mlps_match_eager_ones_through_the_reentrant_checkpoint(
        saved_policy, monkeypatch, moved_to_host, offload):
    """Compiled layers with sliced MLPs checkpoint through the library's reentrant checkpoint, their input kept on
    the device or offloaded (PyTorch's non-reentrant checkpoint around the compiled pieces failed on an H200): the
    forward slices without autograd, the recomputation through the tiled function, and the logits and gradients
    are the eager whole MLP's."""
    import lightning_rl.tiled_mlp as tiled_mlp
    from lightning_rl.checkpoint_offload import _OffloadedLayer

    torch._dynamo.reset()
    calls, slicings, checkpoints = [], [], []
    apply, sliced, reentrant = TiledMLPFunction.apply, tiled_mlp.sliced, _OffloadedLayer.apply
    monkeypatch.setattr(TiledMLPFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    monkeypatch.setattr(tiled_mlp, "sliced", lambda *a: slicings.append(torch.is_grad_enabled()) or sliced(*a))
    monkeypatch.setattr(_OffloadedLayer, "apply", lambda *a: checkpoints.append(a[-1]) or reentrant(*a))
    eager, compiled = saved_policy(), saved_policy()
    enable_activation_checkpointing(eager)
    enable_activation_checkpointing(compiled, offload=offload)
    for m in (eager, compiled):
        m.train()
    tile_decoder_mlps(compiled)
    compile_decoder_layers(compiled, backend="aot_eager")
    for length in (11, 7):
        ids = torch.randint(0, eager.config.vocab_size, (2, length))
        (le, ge), (lc, gc) = _loss_and_grads(eager, ids), _loss_and_grads(compiled, ids)
        torch.testing.assert_close(lc, le, rtol=0, atol=1e-5)
        for n in ge:
            torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-6)
    # two layers, two lengths: one reentrant checkpoint each, offloading as asked; the forward slices without
    # autograd, the recomputation through the tiled function (whose own forward slices with autograd off too)
    assert checkpoints == [offload] * 4
    assert len(calls) == 4 and slicings == [False] * 8
    assert len(moved_to_host) == (4 if offload else 0)


def test_eval_mode_runs_the_whole_mlp_and_a_no_grad_train_forward_slices_without_autograd(saved_policy, monkeypatch):
    """Generation and evaluation (eval mode) run the MLP as it is; a train-mode forward without gradients (a
    reentrant checkpoint's first pass, old log-probs over the update's tokens) slices, with nothing for autograd,
    and gives the whole MLP's values."""
    import lightning_rl.tiled_mlp as tiled_mlp

    model = saved_policy()
    tile_decoder_mlps(model)
    calls, slicings = [], []
    sliced = tiled_mlp.sliced
    monkeypatch.setattr(TiledMLPFunction, "apply", lambda *a: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr(tiled_mlp, "sliced", lambda *a: slicings.append(1) or sliced(*a))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    model.eval()
    whole = model(input_ids=ids, use_cache=False).logits  # eval mode, gradients on
    assert slicings == []
    model.train()
    with torch.no_grad():
        sliced_logits = model(input_ids=ids, use_cache=False).logits  # train mode, no gradients
    assert calls == [] and len(slicings) == 2  # one per layer
    torch.testing.assert_close(sliced_logits, whole.detach(), rtol=0, atol=1e-5)
    assert model.state_dict().keys() == saved_policy().state_dict().keys()


def test_mlps_with_dropout_or_experts_are_not_tiled(saved_policy):
    assert "dropout" in tiling_unsupported_reason(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)))
    assert tiling_unsupported_reason(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0))) is None

    class SparseMoeBlock(nn.Module):
        pass

    assert "experts" in tiling_unsupported_reason(SparseMoeBlock())
    model = apply_lora(saved_policy(), {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "all-linear"})
    assert tile_decoder_mlps(model) == 0
    assert not any(is_tiled(m) for m in model.modules())


def test_tiling_is_refused_with_sharded_layers_only():
    check_tiling(True, sharded=False)
    check_tiling(False, sharded=True)
    with pytest.raises(ValueError, match="ModelParallelStrategy"):
        check_tiling(True, sharded=True)


def test_the_module_tiles_when_asked_and_not_by_default(make_grpo, make_data):
    import lightning as L

    module = make_grpo(model_config={"num_hidden_layers": 2})
    assert module.tile_mlps is False
    module.setup("fit")
    assert module.tile_mlps is False
    module.configure_model()
    assert tiled_mlp_count(module.policy) == 0

    asked = make_grpo(model_config={"num_hidden_layers": 2}, tile_mlps=True, gradient_checkpointing=True)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    calls = []
    apply = TiledMLPFunction.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TiledMLPFunction, "apply", lambda *a: calls.append(1) or apply(*a))
        trainer.fit(asked, datamodule=make_data())
    assert tiled_mlp_count(asked.policy) == 2
    assert calls  # the update ran through the tiled MLPs
    assert all(torch.isfinite(p).all() for p in asked.policy.parameters())

    with pytest.raises(ValueError, match="tile_mlps"):
        make_grpo(tile_mlps="yes")


def test_the_memory_plan_counts_one_slice_of_the_mlp_in_the_recomputed_layer():
    from types import SimpleNamespace

    from lightning_rl.plugins.memory_plan import RECOMPUTED_LAYER_COPIES, activation_bytes_per_token

    qwen05 = SimpleNamespace(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2)
    whole = activation_bytes_per_token(qwen05, 2, gradient_checkpointing=True, offload_checkpoints=True)
    tiled = activation_bytes_per_token(qwen05, 2, gradient_checkpointing=True, offload_checkpoints=True,
                                       tile_mlps=True)
    assert whole - tiled == RECOMPUTED_LAYER_COPIES * 5 * (4864 - 896) * 2
    assert activation_bytes_per_token(qwen05, 2, tile_mlps=True) == activation_bytes_per_token(qwen05, 2)
