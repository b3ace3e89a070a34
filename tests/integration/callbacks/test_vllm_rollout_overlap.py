"""VLLMRollout(overlap=True) through Trainer.fit on CPU: the next batch is generated during the current update,
from the weights the update starts from, and trains one optimizer step later (engine: a snapshot of the policy)."""

import copy
import threading

import lightning as L
import pytest
import torch
from helpers import SUM_ROWS, rollout_grpo

from lightning_rl import PromptDataModule, VLLMRollout
from lightning_rl.rollout import HFEngine


class SnapshotEngine:
    """Generates with a copy of the policy taken at creation and at each sync (as a separate engine holds one)."""

    def __init__(self, module, log):
        self.module, self.log = module, log
        self.sync_weights(module.policy)

    def sync_weights(self, model):
        self.copy = copy.deepcopy(model).eval()
        self.step = self.module.trainer.global_step if self.module._trainer is not None else 0
        self.log.append(("sync", self.step))

    def generate(self, prompt_ids, sampling, num_generations):
        self.log.append(("generate", self.step, threading.current_thread().name))
        engine = HFEngine(lambda: self.copy, self.module.tokenizer.pad_token_id, self.module.eos_token_ids)
        rollout = engine.generate(prompt_ids, sampling, num_generations)
        rollout.extras.update(weights_step=self.step, prompt_ids=[list(p) for p in prompt_ids])
        return rollout

    def wake_up(self):
        pass

    def sleep(self):
        pass

    def shutdown(self):
        self.log.append(("shutdown",))


def _fit(module, steps, rows=SUM_ROWS, **trainer_kw):
    log, seen = [], []
    cb = VLLMRollout(overlap=True, engine_factory=lambda m, n, seed: SnapshotEngine(m, log))
    original = module.training_step

    def spy(batch, batch_idx):
        r = batch["rollout"]
        seen.append({"global_step": module.trainer.global_step, "weights_step": r.extras["weights_step"],
                     "prompt_ids": r.extras["prompt_ids"], "expected_ids": module.encode(batch["prompt"]),
                     "staleness": cb.last_timings["staleness"],
                     "background_s": cb.last_timings["background_generate_s"]})
        return original(batch, batch_idx)

    module.training_step = spy
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb], **trainer_kw)
    trainer.fit(module, datamodule=PromptDataModule(train_data=rows, batch_size=2, shuffle=False))
    return trainer, cb, log, seen


def test_each_rollout_after_the_first_was_generated_during_the_last_update_from_its_starting_weights():
    torch.manual_seed(0)
    trainer, cb, log, seen = _fit(rollout_grpo(), steps=4)
    assert trainer.global_step == 4 and cb.overlapping and cb.engine is None
    assert [s["global_step"] - s["weights_step"] for s in seen] == [0, 1, 1, 1]
    assert [s["staleness"] for s in seen] == [0.0, 1.0, 1.0, 1.0]
    # the first rollout is generated in place; the others report their time in the background thread
    assert seen[0]["background_s"] == 0.0 and all(s["background_s"] > 0 for s in seen[1:])
    assert all(s["prompt_ids"] == s["expected_ids"] for s in seen)  # each batch trained on its own prompts
    generates = [e for e in log if e[0] == "generate"]
    assert len(generates) == 4  # none for a batch after the last step
    assert generates[0][2] == threading.main_thread().name
    assert all(g[2].startswith("lightning-rl-rollout") for g in generates[1:])  # beside the update
    # the engine took the weights each update started from, before the update ran
    assert [e for e in log if e[0] == "sync"] == [("sync", 0), ("sync", 1), ("sync", 2)]
    assert log[-1] == ("shutdown",)


def test_an_epoch_boundary_generates_its_first_batch_in_place():
    rows = SUM_ROWS[:6]  # 3 batches an epoch
    trainer, cb, log, seen = _fit(rollout_grpo(), steps=5, rows=rows)
    assert trainer.global_step == 5
    assert [s["global_step"] - s["weights_step"] for s in seen] == [0, 1, 1, 0, 1]
    assert all(s["prompt_ids"] == s["expected_ids"] for s in seen)
    assert len([e for e in log if e[0] == "generate"]) == 5  # nothing generated for the next epoch's order


def test_limit_train_batches_generates_nothing_past_the_limit():
    trainer, cb, log, seen = _fit(rollout_grpo(), steps=4, limit_train_batches=2)
    assert trainer.global_step == 4
    assert [s["global_step"] - s["weights_step"] for s in seen] == [0, 1, 0, 1]
    assert len([e for e in log if e[0] == "generate"]) == 4


def test_a_run_resumed_from_a_checkpoint_saved_while_a_batch_was_peeked_trains_the_same_batches(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(steps, ckpt_path=None, seed=0):
        L.seed_everything(seed, verbose=False)
        module, trained = rollout_grpo(), []
        cb = VLLMRollout(overlap=True, engine_factory=lambda m, n, s: SnapshotEngine(m, []))
        original = module.training_step

        def spy(batch, batch_idx):
            trained.append(list(batch["prompt"]))
            return original(batch, batch_idx)

        module.training_step = spy
        ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[cb, ckpt])
        trainer.fit(module, datamodule=PromptDataModule(train_data=SUM_ROWS, batch_size=2, shuffle=True),
                    ckpt_path=ckpt_path)
        return trained

    whole = run(4)  # its checkpoint after step 2 was saved while batch 3's prompts were being generated
    resumed = run(4, ckpt_path=tmp_path / "epoch=0-step=2.ckpt", seed=7)
    assert len(whole) == 4 and resumed == whole[2:]


class SharedBaseEngine(SnapshotEngine):
    """An engine whose merged weights the trainer reads (a shared LoRA base): every update needs a sync first."""

    syncs_before_each_update = True


def test_an_engine_that_shares_its_weights_is_synced_before_every_update_even_the_last_of_an_epoch():
    log, seen = [], []
    cb = VLLMRollout(overlap=True, engine_factory=lambda m, n, seed: SharedBaseEngine(m, log))
    module = rollout_grpo()
    original = module.training_step

    def spy(batch, batch_idx):  # the engine's weights are the ones this update starts from
        seen.append((module.trainer.global_step, cb.engine.step))
        return original(batch, batch_idx)

    module.training_step = spy
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(module, datamodule=PromptDataModule(train_data=SUM_ROWS[:4], batch_size=2, shuffle=False))
    assert seen == [(0, 0), (1, 1), (2, 2), (3, 3)]  # batches 2 and 4 end an epoch: nothing generated ahead
    assert [e for e in log if e[0] == "sync"] == [("sync", 0), ("sync", 1), ("sync", 2), ("sync", 3)]


def test_a_rollout_one_step_old_gets_importance_weights_from_a_custom_engine():
    module = rollout_grpo()  # importance_sampling="auto"; the snapshot engine does not say it is vLLM
    levels = []
    original = module.policy_loss

    def spy(exp, rows, out):
        levels.append((exp.rollout.extras["staleness"], module.importance_level(exp.rollout)))
        return original(exp, rows, out)

    module.policy_loss = spy
    _fit(module, steps=3)
    assert sorted(set(levels)) == [(0, "none"), (1, "token")]  # the first rollout is in place, then one step old


def test_several_optimizer_steps_a_batch_generate_nothing_for_a_batch_past_max_steps():
    trainer, cb, log, seen = _fit(rollout_grpo(num_mini_batches=2, micro_batch_size=2), steps=4)
    assert trainer.global_step == 4 and len(seen) == 2
    assert len([e for e in log if e[0] == "generate"]) == 2  # not a third for a batch that cannot train


def test_a_bad_prompt_in_the_next_batch_fails_at_its_own_batch_after_this_one_trained(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_rl.prompting import PromptTooLongError

    rows = [*SUM_ROWS[:2], {"prompt": "1+" * 30 + "1=", "answer": "31"}, *SUM_ROWS[2:5]]  # the 2nd batch's
    module = rollout_grpo(max_prompt_length=16)
    log = []
    cb = VLLMRollout(overlap=True, engine_factory=lambda m, n, seed: SnapshotEngine(m, log))
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb, ckpt])
    # a DataModule's prompts are all checked at fit start; a loader of the user's own is met batch by batch
    data = PromptDataModule(train_data=rows, batch_size=2, shuffle=False)
    data.setup("fit")
    with pytest.raises(PromptTooLongError, match="more than max_prompt_length=16"):
        trainer.fit(module, train_dataloaders=data.train_dataloader())
    assert trainer.global_step == 1 and [p.name for p in tmp_path.iterdir()] == ["epoch=0-step=1.ckpt"]
