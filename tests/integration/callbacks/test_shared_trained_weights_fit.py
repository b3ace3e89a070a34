"""A full GRPO fit through ``Trainer.fit`` whose bf16 weights are an engine process's own, on a CPU.

``MemoryAwarePrecision(master_weights="cpu")`` keeps the fp32 masters in host memory and bf16 copies as the
parameters. The engine is :class:`~lightning_rl.rollout.vllm_process.VLLMProcessEngine`'s own weight handling
against its worker (``PolicyWeightReceiver``) in this process, with a vLLM-shaped fake model (CUDA IPC replaced by
handing over the same tensors), and it generates with transformers from a copy of the model whose weights are views
of that fake's storage, as vLLM generates from its own weights. The rollouts overlap the updates, and validation
runs after every batch while the next batch's rollout is being generated.
"""

import functools
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import SUM_ROWS, host_steps_on_a_cpu, rollout_grpo

from lightning_rl import MemoryAwarePrecision, PromptDataModule, VLLMRollout
from lightning_rl.rollout import EngineSettings, vllm_process

sys.path.insert(0, str(Path(__file__).parents[2] / "unit" / "rollout"))
from cpu_engine_process import CPUProcessEngine, watch_fit  # noqa: E402
from test_merged_base_protocol import LoadingFakeModel, _engine_rows, _hand_over  # noqa: E402


class CPUSharedEngine(CPUProcessEngine):
    """The engine process's weight handling in this process; generation from its weights by transformers."""

    def __init__(self, module, path):
        policy = module.policy
        self.masters = module.trainer.precision_plugin.host_master_weights
        super().__init__(LoadingFakeModel({n: torch.zeros(p.shape, dtype=torch.bfloat16)
                                           for n, p in policy.named_parameters()}))
        self.sync_weights(policy)
        self._share_trained_weights(policy, self.masters)
        self.generate_from(module, path, "bfloat16")


@pytest.mark.parametrize("step_on_host", [False, "auto"], ids=["streamed-step", "step-shared-with-the-cpu"])
def test_a_full_fit_whose_weights_are_the_engines_trains_syncs_each_step_and_ends_with_private_weights(
        saved_tiny_llama, monkeypatch, step_on_host):
    monkeypatch.setattr(vllm_process, "ipc_handles", functools.partial(vllm_process.ipc_handles, reduce=_hand_over))
    monkeypatch.setattr("torch.multiprocessing.reductions.reduce_tensor", _hand_over)
    on_cpu = host_steps_on_a_cpu(monkeypatch) if step_on_host else []  # the gradients in host memory, as on CUDA
    path = saved_tiny_llama(2)
    torch.manual_seed(0)
    module = rollout_grpo(model=path, learning_rate=1e-3)
    engines = []
    cb = VLLMRollout(overlap=True, settings=EngineSettings(share_trained_weights=True),
                     engine_factory=lambda m, n, seed: engines.append(CPUSharedEngine(m, path)) or engines[-1])

    def check(engine):  # each update reads the engine's weights, holding the rounded masters
        masters, inside, exact = engine.masters, True, True
        for name, p in module.policy.named_parameters():
            if masters.manages(p):
                inside &= p.data_ptr() == _engine_rows(engine.fake, name).data_ptr()
                exact &= torch.equal(p.data, masters.master(p).to(torch.bfloat16))
        return inside, exact

    seen, validated, watch = watch_fit(module, engines, check)
    plugin = MemoryAwarePrecision(master_weights="cpu", step_on_host=step_on_host)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, watch],
                        plugins=[plugin], val_check_interval=1, num_sanity_val_steps=1)
    module.configure_model()
    start = {n: p.detach().float().clone() for n, p in module.policy.named_parameters()}
    data = PromptDataModule(train_data=SUM_ROWS[:4], val_data=SUM_ROWS[4:6], batch_size=2, shuffle=False)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4 and cb.overlapping and len(engines) == 1
    assert [s[0] for s in seen] == [0, 1, 2, 3] and all(s[2] and s[3] for s in seen), seen
    assert [s[1] for s in seen] == [2, 3, 4, 5]  # at the start and after sharing, then before each later update
    assert validated == [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]  # each later validation synced the step first
    assert "val/reward" in trainer.callback_metrics
    engine = engines[-1]
    weights = dict(module.policy.named_parameters())
    assert all(p.dtype == torch.float32 for p in weights.values())  # the fit's end: fp32 masters, private
    down = "model.layers.0.mlp.down_proj.weight"
    assert weights[down].data_ptr() != _engine_rows(engine.fake, down).data_ptr()
    assert not torch.equal(weights[down], start[down])  # it trained
    assert len(on_cpu) == (4 if step_on_host else 0) and all(on_cpu)  # each step put a share on the CPU


def test_a_run_with_shared_weights_resumes_from_its_checkpoint_on_the_saved_masters(saved_tiny_llama, monkeypatch,
                                                                                   tmp_path):
    """The checkpoint holds the fp32 masters (saved while the last step waited in host memory); the resumed run's
    engine starts from them, and its first update reads them rounded, in the engine's weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    monkeypatch.setattr(vllm_process, "ipc_handles", functools.partial(vllm_process.ipc_handles, reduce=_hand_over))
    monkeypatch.setattr("torch.multiprocessing.reductions.reduce_tensor", _hand_over)
    path = saved_tiny_llama(1)

    def fit(steps, ckpt_path=None):
        torch.manual_seed(0)
        module = rollout_grpo(model=path, learning_rate=1e-3)
        engines = []
        cb = VLLMRollout(overlap=True, settings=EngineSettings(share_trained_weights=True),
                         engine_factory=lambda m, n, seed: engines.append(CPUSharedEngine(m, path)) or engines[-1])

        def check(engine):  # the policy's managed weights as the update reads them, and whether they are the engine's
            masters = engine.masters
            weights = {n: p.detach().clone() for n, p in module.policy.named_parameters() if masters.manages(p)}
            inside = all(p.data_ptr() == _engine_rows(engine.fake, n).data_ptr()
                         for n, p in module.policy.named_parameters() if masters.manages(p))
            return inside, weights

        seen, _, watch = watch_fit(module, engines, check)
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[cb, watch, ckpt],
                            plugins=[MemoryAwarePrecision(master_weights="cpu")], limit_val_batches=0)
        trainer.fit(module, datamodule=PromptDataModule(train_data=SUM_ROWS[:8], batch_size=2, shuffle=False),
                    ckpt_path=ckpt_path)
        return trainer, module, seen

    _, first, _ = fit(2)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    down = "model.layers.0.mlp.down_proj.weight"
    assert saved[f"policy.{down}"].dtype == torch.float32
    assert torch.equal(saved[f"policy.{down}"], dict(first.policy.named_parameters())[down])  # the masters
    trainer, _, seen = fit(4, ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 4 and [s[0] for s in seen] == [2, 3] and all(s[2] for s in seen)
    resumed = seen[0][3]
    assert resumed and all(torch.equal(w, saved[f"policy.{n}"].to(torch.bfloat16)) for n, w in resumed.items())
    assert not all(torch.equal(w, seen[1][3][n]) for n, w in resumed.items())  # the resumed run trained on
