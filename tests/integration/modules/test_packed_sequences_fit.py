"""GRPO, PPO and DPO fits with packed sequences train as with the padded layout (CPU, the reference attention)."""

import pytest
import torch


@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "recomputed"])
def test_a_grpo_fit_with_packed_sequences_trains_as_the_padded_one(saved_tiny_llama, monkeypatch, checkpointing):
    from helpers import SAY_ROWS, make_trainer, tiny_grpo

    import lightning_rl.packing as packing
    from lightning_rl import PromptDataModule

    calls = []
    inner = packing._reference_attention
    monkeypatch.setattr(packing, "_reference_attention", lambda *a: calls.append(1) or inner(*a))
    path = saved_tiny_llama(1)
    runs = []
    for pack in (False, True):
        module = tiny_grpo(path, pack_sequences=pack, gradient_checkpointing=checkpointing)
        make_trainer(max_steps=2).fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
        runs.append({n: p.detach().clone() for n, p in module.policy.named_parameters()})
        assert bool(calls) is pack  # the padded fit never reached the packed attention; the packed one did
    for name, w in runs[0].items():
        torch.testing.assert_close(runs[1][name], w, rtol=1e-4, atol=1e-5, msg=name)


def test_a_ppo_fit_with_packed_sequences_trains_as_the_padded_one(saved_tiny_llama, monkeypatch):
    """The value head on the shared backbone reads the packed forward's hidden states too."""
    import lightning as L
    from helpers import SAY_ROWS, high_ids, make_trainer

    import lightning_rl.modules.policy as policy
    from lightning_rl import PPO, PromptDataModule, SamplingConfig

    calls = []
    inner = policy.packed_completion_hidden_states
    monkeypatch.setattr(policy, "packed_completion_hidden_states", lambda *a, **k: calls.append(1) or inner(*a, **k))
    runs = []
    for pack in (False, True):
        L.seed_everything(0, verbose=False)
        module = PPO(reward_funcs=[high_ids], model=saved_tiny_llama(1), num_generations=2, num_iterations=1,
                     sampling=SamplingConfig(max_new_tokens=4), learning_rate=3e-3, chat_template=False,
                     max_prompt_length=16, pack_sequences=pack)
        make_trainer(max_steps=2).fit(module, PromptDataModule(train_data=SAY_ROWS, batch_size=2))
        assert module.packs_sequences(module.policy) is pack
        assert bool(calls) is pack  # the policy's forward with the value head packed, or never reached packing
        runs.append({n: p.detach().clone() for n, p in module.named_parameters()})
    for name, w in runs[0].items():
        torch.testing.assert_close(runs[1][name], w, rtol=1e-4, atol=1e-5, msg=name)


def test_a_dpo_fit_with_packed_sequences_trains_as_the_padded_one(saved_tiny_llama):
    import lightning as L
    from helpers import make_trainer

    from lightning_rl import DPO, PreferenceDataModule

    pairs = [{"prompt": "abc"[: 1 + i % 3], "chosen": "x" * (1 + i % 4), "rejected": "yz" * (1 + i % 2)}
             for i in range(8)]
    runs = []
    for pack in (False, True):
        L.seed_everything(0, verbose=False)
        module = DPO(beta=0.1, model=saved_tiny_llama(1), learning_rate=1e-3, pack_sequences=pack)
        make_trainer(max_steps=2).fit(module, PreferenceDataModule(pairs, batch_size=4))
        assert module.packs_sequences(module.policy) is pack
        runs.append({n: p.detach().clone() for n, p in module.policy.named_parameters()})
    for name, w in runs[0].items():
        torch.testing.assert_close(runs[1][name], w, rtol=1e-4, atol=1e-5, msg=name)
