"""A checkpointed, compiled GRPO fit with sliced MLPs trains as the compiled fit with whole MLPs (CPU), its layers
checkpointed by the library's reentrant checkpoint with the input kept on the device or offloaded."""

import functools

import pytest
import torch
from torch._dynamo.utils import counters


@pytest.mark.parametrize("offload", [False, True], ids=["kept", "offloaded"])
def test_a_compiled_fit_with_tiled_mlps_trains_as_with_whole_ones(saved_tiny_llama, moved_to_host, monkeypatch,
                                                                   offload):
    """``tile_mlps=True`` with ``compile_layers=True`` (refused on CUDA until PyTorch's non-reentrant checkpoint
    around the compiled pieces was replaced by the library's reentrant one): two steps end at the whole MLPs'
    weights within float32 rounding, every update forward went through the reentrant checkpoint and the sliced
    MLP, and nothing broke the compiled graphs beyond the MLP's own split."""
    from helpers import SAY_ROWS, make_trainer, node_counting_backend, tiny_grpo

    import lightning_rl.checkpoint_offload as checkpoint_offload
    import lightning_rl.modules.policy as policy
    from lightning_rl import PromptDataModule
    from lightning_rl.compiled_layers import compile_decoder_layers
    from lightning_rl.models import enable_activation_checkpointing
    from lightning_rl.tiled_mlp import TiledMLPFunction, tiled_mlp_count

    path = saved_tiny_llama(2)
    runs, graphs, checkpoints, tiled_calls = {}, {}, [], []
    reentrant, apply = checkpoint_offload._OffloadedLayer.apply, TiledMLPFunction.apply
    monkeypatch.setattr(checkpoint_offload._OffloadedLayer, "apply",
                        lambda *a: checkpoints.append(a[-1]) or reentrant(*a))
    monkeypatch.setattr(TiledMLPFunction, "apply", lambda *a: tiled_calls.append(1) or apply(*a))
    for tiled in (False, True):
        nodes = []
        compile_aot_eager = functools.partial(compile_decoder_layers, backend=node_counting_backend("aot_eager", nodes))
        monkeypatch.setattr(policy, "compile_decoder_layers", compile_aot_eager)
        monkeypatch.setattr(policy, "enable_activation_checkpointing",
                            lambda net, offload=False, on=offload and tiled: enable_activation_checkpointing(
                                net, offload=on))
        torch._dynamo.reset()
        counters.clear()
        module = tiny_grpo(path, pack_sequences=False, gradient_checkpointing=True, compile_layers=True,
                           tile_mlps=tiled)
        make_trainer(max_steps=2).fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
        assert tiled_mlp_count(module.policy) == (2 if tiled else 0)
        runs[tiled] = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
        graphs[tiled] = nodes
    # the whole-MLP run checkpoints through PyTorch's; the tiled run through the library's, in every update
    # forward of both layers (4 forwards of the update in 2 steps, at least), offloading as asked
    assert checkpoints and len(checkpoints) % 2 == 0 and set(checkpoints) == {offload}
    assert len(tiled_calls) == len(checkpoints)  # one tiled recomputation per checkpointed layer
    assert len(moved_to_host) == (len(checkpoints) if offload else 0)
    assert min(graphs[False]) > 50 and graphs[True], graphs  # compiled: whole layers, then the MLP's halves
    # the slices sum in another order: float32 roundings, which Adam turns into up to a step's size (lr 3e-3) on an
    # element whose gradient is near its epsilon: within 1% of one step
    for name, w in runs[False].items():
        torch.testing.assert_close(runs[True][name], w, rtol=1e-4, atol=0.01 * 3e-3, msg=name)
