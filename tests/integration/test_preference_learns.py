"""DPO, ORPO and KTO learn a synthetic preference on a tiny model (CPU, a few seconds each)."""

import random
import string

import lightning as L
import pytest
import torch

from lightning_rl import DPO, KTO, ORPO, PreferenceDataModule, SamplingConfig
from lightning_rl.data import InvalidPreferenceError
from lightning_rl.modules.dpo import online_pairs

TINY = dict(model="tiny-llama", learning_rate=1e-3, max_grad_norm=1.0)


def sorted_pairs(n: int, seed: int) -> list[dict]:
    """Prompt: random letters; chosen: the letters sorted ascending; rejected: descending.

    Both responses hold the same characters, so a random model has no preference on average;
    held-out pairs use new letter strings, so rising accuracy means the rule was learned.
    """
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        w = [rng.choice(string.ascii_lowercase[:12]) for _ in range(rng.randint(4, 7))]
        c, r = "".join(sorted(w)), "".join(sorted(w, reverse=True))
        if c != r:
            rows.append({"prompt": "".join(w), "chosen": c, "rejected": r})
    return rows


def trainer(epochs: int = 1, callbacks=(), max_steps: int = -1) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, max_steps=max_steps, accelerator="cpu", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, callbacks=list(callbacks))


def validate(module, dm) -> dict[str, float]:
    return trainer().validate(module, dm, verbose=False)[0]


def test_dpo_learns_held_out_preference():
    L.seed_everything(0)
    dm = PreferenceDataModule(sorted_pairs(64, 1), sorted_pairs(48, 2), batch_size=8)
    module = DPO(beta=0.1, **TINY)
    before = validate(module, dm)
    trainer(epochs=4).fit(module, dm)
    after = validate(module, dm)
    assert module.reference_mode == "precomputed" and not module._frozen_reference  # no second model
    assert before["val/rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert before["val/loss"] == pytest.approx(0.6931, abs=1e-3)
    assert after["val/logp_accuracy"] >= before["val/logp_accuracy"] + 0.3, (before, after)
    assert after["val/logp_accuracy"] >= 0.9 and after["val/rewards/accuracy"] >= 0.9, after
    assert after["val/rewards/margins"] > 0.5, after
    assert after["val/loss"] < 0.45, after


class StepLosses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(trainer.callback_metrics["train/loss_step"].item())


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_precomputed_reference_gives_the_live_loss(loss_type):
    rows = sorted_pairs(24, 3)
    runs = {}
    for reference in ("live", "precomputed"):
        L.seed_everything(0)
        dm = PreferenceDataModule(rows, batch_size=8)
        module = DPO(beta=0.1, loss_type=loss_type, reference=reference, **TINY)
        cb = StepLosses()
        trainer(epochs=2, callbacks=[cb]).fit(module, dm)
        runs[reference] = (cb.losses, module)
    live, pre = runs["live"][0], runs["precomputed"][0]
    assert len(live) == 6
    assert live[0] != pytest.approx(live[-1])  # the policy moved away from the reference
    assert pre == pytest.approx(live, rel=1e-4, abs=1e-5)
    assert runs["live"][1]._frozen_reference and not runs["precomputed"][1]._frozen_reference
    assert len(runs["precomputed"][1]._ref_cache["train"]) == 24


def test_lora_reference_is_the_adapter_disabled_base():
    L.seed_everything(0)
    rows = sorted_pairs(8, 4)
    dm = PreferenceDataModule(rows, batch_size=8)
    module = DPO(beta=0.1, lora={"r": 4, "lora_alpha": 8}, model="tiny-llama", learning_rate=1e-2)
    trainer(max_steps=2).fit(module, dm)
    assert module.reference_mode == "live" and not module._frozen_reference
    batch = next(iter(dm.reference_dataloader("train")))
    ref = module.compute_reference_logps(batch)
    with module.policy.disable_adapter(), torch.no_grad():
        module.policy.eval()
        seqs = module.tokenize(batch["prompt"], batch["chosen"])
        base = module.summed_logps(module.policy, seqs)
    with torch.no_grad():
        trained = module.summed_logps(module.policy, seqs)
    torch.testing.assert_close(ref[:, 0], base)
    assert not torch.allclose(trained, base)  # the adapters did train


def test_online_dpo_ranks_two_samples_by_reward():
    chosen, valid = online_pairs(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [float("nan"), 1.0]]))
    assert chosen[:2].tolist() == [0, 1] and valid.tolist() == [True, True, False, False]

    def more_as(prompts, completions, **_):
        return [c.count("a") - 0.01 * len(c) for c in completions]

    L.seed_everything(0)
    prompts = [{"prompt": p["prompt"]} for p in sorted_pairs(8, 5)]
    dm = PreferenceDataModule([{**p, "chosen": "x", "rejected": "y"} for p in prompts], batch_size=4)
    module = DPO(beta=0.1, online=True, reward_funcs=[more_as], sampling=SamplingConfig(max_new_tokens=8), **TINY)
    assert module.reference_mode == "live"
    module.configure_model()
    before = [p.detach().clone() for p in module.policy.parameters()]
    t = trainer(max_steps=2)
    t.fit(module, dm)
    assert module._frozen_reference  # full fine-tune online: a frozen copy is the reference
    assert any(not torch.equal(a, b) for a, b in zip(before, module.policy.parameters()))
    m = t.callback_metrics
    assert "train/reward" in m and "train/tie_frac" in m
    assert "train/rewards/margins" in m and m["train/rewards/accuracy"].item() >= 0.0
    with pytest.raises(ValueError, match="reward_funcs"):
        DPO(online=True)
    with pytest.raises(ValueError, match="cannot be precomputed"):
        DPO(online=True, reward_funcs=[more_as], reference="precomputed")


def test_orpo_learns_held_out_preference():
    L.seed_everything(0)
    dm = PreferenceDataModule(sorted_pairs(64, 1), sorted_pairs(48, 2), batch_size=8)
    module = ORPO(beta=1.0, **TINY)
    before = validate(module, dm)
    trainer(epochs=4).fit(module, dm)
    after = validate(module, dm)
    assert module.reference_mode == "none" and not module._frozen_reference
    assert after["val/accuracy"] >= before["val/accuracy"] + 0.3, (before, after)
    assert after["val/accuracy"] >= 0.9, after
    assert after["val/log_odds_margin"] > before["val/log_odds_margin"] + 0.5, (before, after)
    assert after["val/nll"] < before["val/nll"]  # the SFT part learns the chosen responses too


def test_orpo_refuses_an_empty_chosen_response():
    rows = sorted_pairs(4, 1) + [{"prompt": "abc", "chosen": "", "rejected": "cba"}]
    with pytest.raises(InvalidPreferenceError, match="row 4 of the training dataset has an empty 'chosen'"):
        trainer().fit(ORPO(**TINY), PreferenceDataModule(rows, batch_size=4))


def test_kto_raises_the_desirable_undesirable_gap():
    L.seed_everything(0)
    dm = PreferenceDataModule(sorted_pairs(48, 1), sorted_pairs(32, 2), mode="unpaired", batch_size=16)
    module = KTO(beta=0.1, **TINY)
    before = validate(module, dm)
    trainer(epochs=4).fit(module, dm)
    after = validate(module, dm)
    gap_before = before["val/rewards/desirable"] - before["val/rewards/undesirable"]
    gap_after = after["val/rewards/desirable"] - after["val/rewards/undesirable"]
    assert gap_before == pytest.approx(0.0, abs=1e-6)
    assert gap_after > 0.5, (before, after)
    assert after["val/rewards/desirable"] > 0 > after["val/rewards/undesirable"], after
    assert after["val/loss"] < before["val/loss"] - 0.05, (before, after)
    assert after["val/kl"] >= 0


def test_kto_with_only_desirable_rows_is_refused():
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in sorted_pairs(8, 1)]
    dm = PreferenceDataModule(rows, mode="unpaired", batch_size=4)
    with pytest.raises(ValueError, match="8 desirable and 0 undesirable.*desirable_weight / undesirable_weight"):
        trainer(max_steps=1).fit(KTO(**TINY), dm)


def test_kto_imbalance_warns_with_weights():
    pairs = sorted_pairs(8, 1)
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in pairs]
    rows += [{"prompt": pairs[0]["prompt"], "completion": pairs[0]["rejected"], "label": False}]
    dm = PreferenceDataModule(rows, mode="unpaired", batch_size=9)
    with pytest.warns(UserWarning, match=r"8 desirable .* 1 undesirable.*Try desirable_weight=0.146"):
        trainer(max_steps=1).fit(KTO(**TINY), dm)


def test_kto_needs_unpaired_batches():
    dm = PreferenceDataModule(sorted_pairs(4, 1), batch_size=4)  # paired mode
    with pytest.raises(ValueError, match="mode='unpaired'"):
        trainer(max_steps=1).fit(KTO(**TINY), dm)
    # without the datamodule check (plain dataloaders), the batch itself is refused
    module = KTO(**TINY)
    with pytest.raises(KeyError, match="mode='unpaired'"):
        trainer(max_steps=1).fit(module, dm.train_dataloader())
