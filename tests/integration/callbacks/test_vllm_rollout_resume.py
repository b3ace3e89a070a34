"""A resumed fit with VLLMRollout (fake engine on CPU): the engine holds the restored weights at its first rollout."""

import lightning as L
import torch
from helpers import SUM_ROWS, FakeEngine, make_trainer, rollout_grpo, state_copy
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_rl import PromptDataModule, VLLMRollout
from lightning_rl.rollout import EngineSettings


class WeightHoldingEngine(FakeEngine):
    """A fake engine that copies the weights it is given, as vLLM does, and records them at every rollout."""

    def __init__(self, module, calls, seed):
        super().__init__(module, calls)
        self.seed = seed
        self.held = state_copy(module.policy)
        self.at_rollout = []

    def sync_weights(self, model):
        super().sync_weights(model)
        self.held = state_copy(model)

    def generate(self, prompt_ids, sampling, num_generations):
        self.at_rollout.append(self.held)
        return super().generate(prompt_ids, sampling, num_generations)


def fit(steps, tmp_path, engines, ckpt_path=None, seed=0, **trainer_kwargs):
    L.seed_everything(seed, verbose=False)
    calls = []
    callback = VLLMRollout(settings=EngineSettings(seed=5), engine_factory=lambda module, n, s: engines.append(
        WeightHoldingEngine(module, calls, s)) or engines[-1])
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    module = rollout_grpo()
    trainer = make_trainer(max_steps=steps, callbacks=[callback, ckpt], enable_checkpointing=True, **trainer_kwargs)
    trainer.fit(module, PromptDataModule(train_data=SUM_ROWS, batch_size=2), ckpt_path=ckpt_path)
    return module, callback, calls


def test_resumed_engine_starts_from_the_checkpoint_weights(tmp_path):
    first = []
    fit(2, tmp_path, first)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    saved = {k[len("policy."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")}
    assert ckpt["callbacks"]["VLLMRollout"]["last_synced_step"] == 1 and ckpt["global_step"] == 2

    resumed = []
    module, callback, calls = fit(4, tmp_path / "resumed", resumed, ckpt_path=tmp_path / "last.ckpt", seed=99)
    engine = resumed[0]
    assert len(resumed) == 1 and engine.seed == 5 + 1  # seeded from the restored step: no replayed samples
    held = engine.at_rollout[0]
    assert any(not torch.equal(held[k], first[0].at_rollout[0][k]) for k in held)  # not the initial weights
    for k, v in saved.items():
        assert torch.equal(held[k], v), k
    assert calls[:4] == ["create", "wake", "sync", "generate"]  # the restored step counts as a new policy
    assert callback.num_rollouts == 2 + 2 and callback.num_syncs == 1 + 2


class RestoresAfterSetup(SingleDeviceStrategy):
    """A CPU strategy that, as FSDP and DeepSpeed do, restores the checkpoint after ``on_fit_start``."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def test_an_engine_resumed_by_a_restore_after_setup_strategy_is_seeded_from_the_restored_step(tmp_path):
    fit(2, tmp_path, [])
    resumed = []
    module, callback, calls = fit(4, tmp_path / "resumed", resumed, ckpt_path=tmp_path / "last.ckpt", seed=99,
                                  strategy=RestoresAfterSetup(device=torch.device("cpu")))
    assert len(resumed) == 1 and resumed[0].seed == 5 + 1  # without waiting for the restore: 5, the first run's
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    held = resumed[0].at_rollout[0]
    for k, v in held.items():
        assert torch.equal(v, saved["policy." + k]), k
    # built at the first batch from the restored weights: the first sync follows the first resumed step
    assert calls[:7] == ["create", "wake", "generate", "sleep", "wake", "sync", "generate"]
    assert callback.num_rollouts == 2 + 2 and callback.num_syncs == 1 + 1


class ReseedingEngine(FakeEngine):
    """A fake engine that seeds the process's global random states when it starts, as vLLM's worker does
    (``set_random_seed`` of its seed) in the process it runs in."""

    def __init__(self, module, calls, seed):
        import random

        torch.manual_seed(seed)
        random.seed(seed)
        super().__init__(module, calls)


def test_an_engine_started_in_this_process_leaves_the_training_random_states_as_they_were():
    """The rollouts sample from the global random state (transformers generate here); an engine that seeds it when
    it starts would make the run's samples depend on when the engine started (the first batch under FSDP2, or
    after a resume). The callback puts the states back: the fit samples and trains as with an engine that does not
    touch them."""
    def run(factory):
        L.seed_everything(3, verbose=False)
        module = rollout_grpo()
        callback = VLLMRollout(overlap=False, engine_factory=factory)
        make_trainer(max_steps=2, callbacks=[callback]).fit(module, PromptDataModule(train_data=SUM_ROWS,
                                                                                    batch_size=2))
        return state_copy(module.policy)

    plain = run(lambda module, n, seed: FakeEngine(module, []))
    reseeded = run(lambda module, n, seed: ReseedingEngine(module, [], seed + 1000))
    for k, v in plain.items():
        assert torch.equal(reseeded[k], v), k
