"""A LoRA GRPO fit through ``Trainer.fit`` with the base shared as an engine process's merged weights, on a CPU.

The engine is :class:`~lightning_rl.rollout.vllm_process.VLLMProcessEngine`'s own weight handling against its
worker (``PolicyWeightReceiver``) in this process, with a vLLM-shaped fake model (CUDA IPC replaced by handing over
the same tensors), and it generates with transformers from a plain copy of the model whose weights are views of
that fake's merged storage, as vLLM generates from its own weights. The rollouts overlap the updates.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from helpers import SUM_ROWS, rollout_grpo

from lightning_rl import PromptDataModule, VLLMRollout
from lightning_rl.rollout import EngineSettings
from lightning_rl.rollout.engine_weights import engine_weights, merged_weight
from lightning_rl.rollout.shared_weights import frozen_base_parameters

sys.path.insert(0, str(Path(__file__).parents[2] / "unit" / "rollout"))
from cpu_engine_process import CPUProcessEngine, watch_fit  # noqa: E402
from test_merged_base_protocol import LoadingFakeModel, _engine_rows, _hand_over  # noqa: E402


class CPUMergedEngine(CPUProcessEngine):
    """The engine process's weight handling in this process; generation from the merged weights by transformers."""

    def __init__(self, module, path):
        policy = module.policy
        super().__init__(LoadingFakeModel({k: torch.zeros_like(v) for k, v in frozen_base_parameters(policy).items()}))
        self.pristine = {k: v.detach().clone() for k, v in frozen_base_parameters(policy).items()}
        self.sync_weights(policy)
        self._share_merged_base(policy)
        self.generate_from(module, path, "float32")


def test_a_lora_fit_with_a_merged_shared_base_trains_and_gives_the_base_back(saved_tiny_llama, monkeypatch):
    import functools

    from lightning_rl.rollout import vllm_process

    monkeypatch.setattr(vllm_process, "ipc_handles", functools.partial(vllm_process.ipc_handles, reduce=_hand_over))
    monkeypatch.setattr("torch.multiprocessing.reductions.reduce_tensor", _hand_over)
    path = saved_tiny_llama(2)
    torch.manual_seed(0)
    module = rollout_grpo(model=path, lora={"r": 4, "lora_alpha": 8}, learning_rate=1e-2)
    engines = []
    cb = VLLMRollout(overlap=True, settings=EngineSettings(share_merged_base=True),
                     engine_factory=lambda m, n, seed: engines.append(CPUMergedEngine(m, path)) or engines[-1])

    def check(engine):  # each update reads the engine's weights, merged with the adapters it starts from
        merged = {w.name: merged_weight(engine.pristine[w.name], w.products) for w in engine_weights(module.policy)}
        exact = all(torch.equal(_engine_rows(engine.fake, n), t) for n, t in merged.items())
        inside = all(p.data_ptr() == _engine_rows(engine.fake, n).data_ptr()
                     for n, p in frozen_base_parameters(module.policy).items())
        return exact, inside

    seen, validated, watch = watch_fit(module, engines, check)
    # validation after every batch, while the next batch's rollout is being generated ahead
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, watch],
                        val_check_interval=1, num_sanity_val_steps=1)
    data = PromptDataModule(train_data=SUM_ROWS[:4], val_data=SUM_ROWS[4:6], batch_size=2, shuffle=False)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4 and cb.overlapping
    assert [s[0] for s in seen] == [0, 1, 2, 3] and all(s[2] and s[3] for s in seen)
    assert [s[1] for s in seen] == [2, 3, 4, 5]  # at the start and after sharing, then before each later update
    # the sanity check needs no sync; each later validation merges the adapters of the step just taken (and the
    # update after it then finds the engine synced)
    assert validated == [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]
    assert "val/reward" in trainer.callback_metrics
    assert any(p.abs().sum() > 0 for n, p in module.policy.named_parameters() if "lora_B" in n)  # it trained
    engine = engines[-1]
    for name, p in frozen_base_parameters(module.policy).items():  # after the fit: private pristine copies
        assert torch.equal(p, engine.pristine[name]) and p.data_ptr() != _engine_rows(engine.fake, name).data_ptr()
