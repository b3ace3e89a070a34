"""``VLLMProcessEngine``'s own weight handling against its worker in this process, for CPU tests.

The worker (``PolicyWeightReceiver``) holds a vLLM-shaped fake model; CUDA IPC is replaced by handing over the same
tensors (the tests patch ``ipc_handles`` and ``reduce_tensor`` with ``_hand_over``). Generation runs transformers
on a copy of the model whose weights are views of the fake's storage, as vLLM generates from its own weights.
"""

from types import SimpleNamespace

import torch
from test_merged_base_protocol import FakeLLM, _engine_rows

from lightning_rl.models import load_policy
from lightning_rl.rollout import HFEngine
from lightning_rl.rollout.merged_base import MergedBase
from lightning_rl.rollout.shared_trained_weights import SharedTrainedWeights
from lightning_rl.rollout.shared_weights import share_base_with_engine
from lightning_rl.rollout.sleep_state import SleepState
from lightning_rl.rollout.vllm_process import VLLMProcessEngine
from lightning_rl.rollout.vllm_worker import PolicyWeightReceiver


def attach_worker(engine: VLLMProcessEngine, fake) -> VLLMProcessEngine:
    """Give ``engine`` (made without its ``__init__``) a worker over ``fake`` and nothing shared yet."""
    worker = PolicyWeightReceiver()
    worker.model_runner = SimpleNamespace(get_model=lambda: fake)
    engine.llm, engine.internals, engine.state, engine._dir = FakeLLM(worker), None, SleepState(), ""
    engine._attached, engine.merged_base, engine.merged_base_freed_bytes = (), MergedBase(), 0
    engine.shared_weights, engine.shared_weights_freed_bytes = SharedTrainedWeights(), 0
    return engine


class CPUProcessEngine(VLLMProcessEngine):
    """An engine process in this process over ``fake``: counts its syncs, generates with transformers.

    Subclasses sync (and share) after ``super().__init__(fake)``, then call :meth:`generate_from`.
    """

    def __init__(self, fake):
        self.fake, self.syncs = fake, 0
        attach_worker(self, fake)

    def generate_from(self, module, path, dtype):
        """Generate with the model saved at ``path``, loaded in ``dtype``, whose weights are views of the fake's."""
        generator, _ = load_policy(path, dtype=dtype)
        generator.requires_grad_(False).eval()
        with torch.no_grad():  # the engine's values now (a resumed run's are not the folder's)
            for name, p in generator.named_parameters():
                p.copy_(_engine_rows(self.fake, name))
        _, reason = share_base_with_engine(generator, self.fake)  # vLLM generates from its own weights
        assert reason is None, reason
        self.inner = HFEngine(generator, module.tokenizer.pad_token_id, module.eos_token_ids)

    def sync_weights(self, model, root=None):
        super().sync_weights(model, root)
        self.syncs += 1

    def generate(self, prompt_ids, sampling, num_generations=1, seed=None):
        return self.inner.generate(prompt_ids, sampling, num_generations)


def watch_fit(module, engines, check):
    """Record ``(global_step, syncs, *check(engine))`` before each update of ``module`` and ``(global_step, syncs)``
    after each validation, with ``engines[-1]`` the engine. Returns ``(seen, validated, callback)``."""
    import lightning as L

    seen, validated = [], []
    original = module.training_step

    def spy(batch, batch_idx):
        engine = engines[-1]
        seen.append((module.trainer.global_step, engine.syncs, *check(engine)))
        return original(batch, batch_idx)

    module.training_step = spy

    class Validated(L.Callback):  # validation generates with the policy: it must read what the last step made
        def on_validation_end(self, trainer, pl_module):
            validated.append((trainer.global_step, engines[-1].syncs))

    return seen, validated, Validated()
