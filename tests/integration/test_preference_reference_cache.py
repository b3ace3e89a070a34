"""Precomputed DPO/KTO reference log-probs are used only for the rows they were computed for (content keys)."""

import logging

import lightning as L
import pytest
import torch
from test_preference_learns import sorted_pairs, trainer

from lightning_rl import DPO, KTO, PreferenceDataModule

STALE = "computed for other rows.*policy has already been updated.*reference='live'"


def dpo(path, **kw):
    return DPO(model=path, beta=0.1, learning_rate=1e-2, reference="precomputed", **kw)


def validate(module, dm) -> dict[str, float]:
    return trainer().validate(module, dm, verbose=False)[0]


@pytest.fixture
def model_dir(saved_tiny_llama):
    return saved_tiny_llama(1)


def test_other_data_of_the_same_size_is_recomputed_before_training(model_dir):
    """Before any step the policy is the reference: margins are 0 on any data, also a second, different set."""
    L.seed_everything(0)
    module = dpo(model_dir)
    train = sorted_pairs(8, 1)
    first = validate(module, PreferenceDataModule(train, sorted_pairs(8, 2), batch_size=8))
    second = validate(module, PreferenceDataModule(train, sorted_pairs(8, 3), batch_size=8))
    assert first["val/rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert second["val/rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # stale set-2 values gave ~0.2 here
    assert second["val/loss"] == pytest.approx(0.6931, abs=1e-4)


def test_trained_policy_refuses_other_validation_data_of_the_same_size(model_dir):
    L.seed_everything(0)
    module = dpo(model_dir)
    train, val_a = sorted_pairs(16, 1), sorted_pairs(8, 2)
    trainer(epochs=2).fit(module, PreferenceDataModule(train, val_a, batch_size=8))
    same = validate(module, PreferenceDataModule(train, val_a, batch_size=8))
    assert same["val/rewards/margins"] > 0.1  # the cached rows are still used
    with pytest.raises(RuntimeError, match=f"rows \\[0, 1, 2, 3, 4\\] of the val data were {STALE}"):
        validate(module, PreferenceDataModule(train, sorted_pairs(8, 3), batch_size=8))


def test_second_fit_on_other_data_is_refused_at_fit_start(model_dir):
    L.seed_everything(0)
    module = dpo(model_dir)
    trainer(max_steps=1).fit(module, PreferenceDataModule(sorted_pairs(8, 1), batch_size=8))
    weights = [p.detach().clone() for p in module.policy.parameters()]
    with pytest.raises(RuntimeError, match=f"of the train data were {STALE}"):
        trainer(max_steps=2).fit(module, PreferenceDataModule(sorted_pairs(8, 4), batch_size=8))
    assert all(torch.equal(a, b) for a, b in zip(weights, module.policy.parameters()))  # no step on stale values


def test_checkpoint_keeps_the_keys(model_dir, tmp_path, caplog):
    L.seed_everything(0)
    module = dpo(model_dir)
    train, val = sorted_pairs(8, 1), sorted_pairs(8, 2)
    t = trainer(max_steps=2)
    t.fit(module, PreferenceDataModule(train, val, batch_size=4))
    t.save_checkpoint(tmp_path / "dpo.ckpt")
    expected = validate(module, PreferenceDataModule(train, val, batch_size=4))

    loaded = DPO.load_from_checkpoint(tmp_path / "dpo.ckpt")
    assert validate(loaded, PreferenceDataModule(train, val, batch_size=4)) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(RuntimeError, match=STALE):
        validate(loaded, PreferenceDataModule(train, sorted_pairs(8, 5), batch_size=4))
    with pytest.raises(RuntimeError, match=STALE):  # a fit from the loaded weights on other data
        trainer(max_steps=3).fit(loaded, PreferenceDataModule(sorted_pairs(8, 6), batch_size=4))

    # a checkpoint of an older version has no keys: its values are used by position, with a warning
    ckpt = torch.load(tmp_path / "dpo.ckpt", weights_only=True)
    for cache in ckpt["preference_reference_cache"].values():
        del cache["keys"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    with caplog.at_level(logging.WARNING):
        old = DPO.load_from_checkpoint(tmp_path / "old.ckpt")
    assert "have no row keys" in caplog.text
    assert validate(old, PreferenceDataModule(train, val, batch_size=4)) == pytest.approx(expected, abs=1e-6)


def test_a_fit_walks_the_datamodules_reference_loaders_once(model_dir):
    """on_fit_start precomputes from the datamodule; on_train_start must not read every row again."""
    L.seed_everything(0)
    walked: list[str] = []

    class Counting(PreferenceDataModule):
        def reference_dataloader(self, split):
            walked.append(split)
            return super().reference_dataloader(split)

    module = dpo(model_dir)
    trainer(max_steps=1).fit(module, Counting(sorted_pairs(8, 1), sorted_pairs(4, 2), batch_size=4))
    assert sorted(walked) == ["train", "val"]
    assert len(module._ref_cache["train"]) == 8 and len(module._ref_cache["val"]) == 4


def test_kto_cache_checks_the_rows_too(model_dir):
    L.seed_everything(0)
    module = KTO(model=model_dir, beta=0.1, learning_rate=1e-2, reference="precomputed")
    train = sorted_pairs(8, 1)
    trainer(max_steps=1).fit(module, PreferenceDataModule(train, sorted_pairs(4, 2), mode="unpaired", batch_size=8))
    with pytest.raises(RuntimeError, match=f"of the val data were {STALE}"):
        validate(module, PreferenceDataModule(train, sorted_pairs(4, 3), mode="unpaired", batch_size=8))


def test_conversational_rows_train_on_the_assistant_reply_only(model_dir):
    """UltraFeedback-style rows: the chosen tokens are the assistant turn, not the repeated user question."""
    q = "What is 2+2?"
    row = {"prompt": q, "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": "4"}],
           "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": "5"}]}
    dm = PreferenceDataModule([row], batch_size=1)
    dm.setup("fit")
    module = DPO(model=model_dir)
    module.configure_model()
    batch = next(iter(dm.train_dataloader()))
    decode = module.tokenizer.decode
    assert decode(module.encode_response(batch["prompt"][0], batch["chosen"][0])) == "4<eos>"
    assert decode(module.encode_response(batch["prompt"][0], batch["rejected"][0])) == "5<eos>"
    assert module.encode_response(q, batch["chosen"][0]) == module.encode_response(q, "4")
    # given straight to the module (no datamodule), a response that repeats the user turn is refused
    with pytest.raises(ValueError, match=r"\['user', 'assistant'\] messages.*PreferenceDataModule splits"):
        module.encode_response(q, row["chosen"])
