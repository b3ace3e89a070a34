"""A GRPO run with VLLMRollout, SIGKILLed after step 2, resumes from last.ckpt: the engine holds the restored weights
at its first rollout and training continues (SmolLM2-135M-Instruct, fp32 engine so weights compare exactly).

The first part runs in a child process (``python tests/gpu/test_vllm_resume.py DIR``): vLLM's sleep-mode
allocator serves one engine per process.
"""

import os
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_rl import GRPO, ArithmeticDataModule, VLLMRollout  # noqa: E402
from lightning_rl.models import load_policy  # noqa: E402
from lightning_rl.rewards import NumericMatch  # noqa: E402
from lightning_rl.rollout import EngineSettings  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.vllm, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

KILLED_AFTER, STEPS = 2, 4
CHECKED = ("model.layers.0.self_attn.o_proj.weight", "model.layers.29.mlp.down_proj.weight",
           "model.embed_tokens.weight")


def run(ckpt_dir, steps, extra=lambda rollout: [], ckpt_path=None):
    """GRPO with VLLMRollout, a checkpoint every step; ``extra(rollout)`` gives callbacks that run before it."""
    torch.manual_seed(0)
    module = GRPO(reward_funcs=[NumericMatch()], model="smollm2-135m-instruct", num_generations=4,
                  sampling={"max_new_tokens": 32},
                  micro_batch_size=16, max_prompt_length=128, learning_rate=1e-4)
    # the in-process engine (its weights are read through engine._runner() below)
    rollout = VLLMRollout(settings=EngineSettings(dtype="float32", sleep_level=0), overlap=False)
    trainer = L.Trainer(max_steps=steps, accelerator="gpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[*extra(rollout), rollout, ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1,
                                                                         save_last=True)])
    trainer.fit(module, datamodule=ArithmeticDataModule(num_train=16, num_val=4, batch_size=4), ckpt_path=ckpt_path)
    return trainer, rollout, trainer.callbacks


class KillAfter(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= KILLED_AFTER:
            os.kill(os.getpid(), signal.SIGKILL)


class EngineWeightsAtFirstRollout(L.Callback):
    """Wraps the engine's generate (before VLLMRollout's hook runs) to copy some of its weights at the first call."""

    def __init__(self, rollout):
        self.rollout, self.seen = rollout, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        engine = self.rollout.engine
        if self.seen is not None or engine is None:
            return
        original = engine.generate

        def generate(*args, **kwargs):
            if self.seen is None:
                params = dict(engine._runner().get_model().named_parameters())
                self.seen = {k: params[k].detach().float().cpu().clone() for k in CHECKED}
            return original(*args, **kwargs)

        engine.generate = generate


def test_resumed_run_gives_the_engine_the_restored_weights(tmp_path):
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == KILLED_AFTER
    saved = {k: ckpt["state_dict"][f"policy.{k}"].float() for k in CHECKED}
    initial = load_policy("smollm2-135m-instruct", dtype="float32")[0].state_dict()
    assert not torch.equal(saved[CHECKED[0]], initial[CHECKED[0]])  # training moved the checked weights

    trainer, rollout, callbacks = run(tmp_path / "resumed", STEPS, extra=lambda cb: [EngineWeightsAtFirstRollout(cb)],
                                      ckpt_path=tmp_path / "last.ckpt")
    engine_check = next(c for c in callbacks if isinstance(c, EngineWeightsAtFirstRollout))
    assert engine_check.seen is not None
    for k in CHECKED:
        vocab = saved[k].shape[0]
        assert torch.equal(engine_check.seen[k][:vocab], saved[k]), k
    print(f"grpo resume: global_step {trainer.global_step}, rollouts {rollout.num_rollouts}, syncs {rollout.num_syncs}")
    assert trainer.global_step == STEPS and rollout.num_rollouts == STEPS


if __name__ == "__main__":
    run(sys.argv[1], STEPS + 2, extra=lambda rollout: [KillAfter()])
