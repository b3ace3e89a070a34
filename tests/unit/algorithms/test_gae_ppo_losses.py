"""GAE, whitening, PPO losses, KL control, the value head and the reward model, against hand-computed values."""

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerFast

from lightning_rl.algorithms.gae import explained_variance, gae, whiten
from lightning_rl.algorithms.losses import clipped_surrogate, masked_mean
from lightning_rl.algorithms.ppo_losses import (
    AdaptiveKLController,
    clipped_value_loss,
    kl_penalty,
    token_rewards,
)
from lightning_rl.logprobs import completion_logprobs
from lightning_rl.models import load_policy
from lightning_rl.modules.value_head import (
    ValueHead,
    check_hidden_state_access,
    completion_hidden_states,
    hidden_size_of,
    logprobs_from_hidden,
)
from lightning_rl.rewards import RewardModel, RewardSet
from lightning_rl.rewards.reward_model import tiny_reward_model
from lightning_rl.tokenizer import SPECIAL_TOKENS, char_tokenizer

# Two sequences: row 0 fills the whole width (truncated at the limit), row 1 ends after 2 tokens.
REWARDS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
VALUES = torch.tensor([[0.5, 0.2, 0.4], [1.0, 0.5, 9.0]])  # 9.0 sits on padding and must be ignored
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


# ----------------------------------------------------------------------------- GAE
def test_gae_matches_hand_computation_with_padding_and_truncation():
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8)
    # row 0: deltas 0.9*0.2-0.5=-0.32, 0.9*0.4-0.2=0.16, 1-0.4=0.6 ; A = delta + 0.72 * A_next
    # row 1: deltas 0.9*0.5-1.0=-0.55, 2-0.5=1.5 (terminal at the last real token), padding 0
    want_adv = torch.tensor([[-0.32 + 0.72 * (0.16 + 0.72 * 0.6), 0.16 + 0.72 * 0.6, 0.6],
                             [-0.55 + 0.72 * 1.5, 1.5, 0.0]])
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, torch.tensor([[0.60624, 0.792, 1.0], [1.53, 2.0, 0.0]]))


def test_gae_limits_are_monte_carlo_and_td():
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))  # reward-to-go
    torch.testing.assert_close(adv, ret - VALUES * MASK)
    adv0, _ = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=0.0)  # one-step TD errors
    torch.testing.assert_close(adv0, torch.tensor([[-0.3, 0.2, 0.6], [-0.5, 1.5, 0.0]]))


def test_gae_empty_row_and_bad_input():
    adv, ret = gae(torch.ones(1, 3), torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.long))
    assert adv.abs().sum() == 0 and ret.abs().sum() == 0
    for name, kwargs in (("gamma", {"gamma": 1.5}), ("gamma", {"gamma": -0.1}), ("lam", {"lam": 1.01}),
                         ("lam", {"lam": float("nan")})):
        with pytest.raises(ValueError, match=f"{name} must be a number in \\[0, 1\\]"):
            gae(REWARDS, VALUES, MASK, **kwargs)
    with pytest.raises(ValueError, match="not right-padded"):
        gae(REWARDS, VALUES, torch.tensor([[1, 0, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match="same \\[B, T\\] shape"):
        gae(REWARDS, VALUES[:, :2], MASK)


def test_ppo_refuses_gamma_or_lambda_outside_unit_interval():
    from lightning_rl import PPO

    with pytest.raises(ValueError, match="gamma must be a number in"):
        PPO(reward_funcs=[lambda p, c, **k: [0.0] * len(c)], model="tiny-llama", gamma=1.2)
    with pytest.raises(ValueError, match="lam must be a number in"):
        PPO(reward_funcs=[lambda p, c, **k: [0.0] * len(c)], model="tiny-llama", lam=-0.5)


def test_whiten_and_explained_variance():
    x = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(whiten(x, m), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(whiten(x, m, shift_mean=False), torch.tensor([[3.0, 4.0, 5.0, 0.0]]),
                               atol=1e-6, rtol=0)
    one = whiten(torch.tensor([[5.0, 1.0]]), torch.tensor([[1, 0]]))  # one value: centered, not blown up
    torch.testing.assert_close(one, torch.zeros(1, 2))
    assert explained_variance(x, x, m) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(x), x, m) == pytest.approx(0.0)
    assert math.isnan(explained_variance(x, torch.ones_like(x), m))


# ----------------------------------------------------------------------------- losses
def test_clipped_policy_loss_per_token_advantages():
    ratio = torch.tensor([[1.5, 0.5, 1.0, 0.5]])
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0]])
    terms = clipped_surrogate(ratio.log(), torch.zeros_like(ratio), adv, 0.2)
    torch.testing.assert_close(terms.loss, torch.tensor([[-1.2, -0.5, 2.0, 0.8]]))
    assert terms.clipped_high.tolist() == [[True, False, False, False]]
    assert terms.clipped_low.tolist() == [[False, False, False, True]]
    mask = torch.tensor([[1, 1, 0, 1]])  # the masked token's loss of 2.0 must not count
    assert masked_mean(terms.loss, mask).item() == pytest.approx((-1.2 - 0.5 + 0.8) / 3)


def test_clipped_value_loss_hand_values():
    values = torch.tensor([[1.0, 0.0, 0.5]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[2.0, 0.0, 1.0]])
    terms = clipped_value_loss(values, old, returns, cliprange_value=0.2)
    # t0: max((1-2)^2, (0.7-2)^2)=1.69 ; t1: max(0, (0.3-0)^2)=0.09 ; t2: unchanged value, 0.25
    torch.testing.assert_close(terms.loss, torch.tensor([[0.845, 0.045, 0.125]]), rtol=1e-6, atol=1e-6)
    assert terms.clipped.tolist() == [[True, True, False]]
    loss = masked_mean(terms.loss, torch.tensor([[1, 1, 0]]))
    assert loss.item() == pytest.approx(0.445)
    loss.backward()  # the clipped branch carries no gradient to the values
    torch.testing.assert_close(values.grad, torch.zeros(1, 3))
    plain = clipped_value_loss(values, old, returns, cliprange_value=None)
    torch.testing.assert_close(plain.loss, torch.tensor([[0.5, 0.0, 0.125]]))


def test_kl_penalty_and_token_rewards():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-1.0))
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(logp, ref, "k2")
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    r = token_rewards(torch.tensor([1.0, 2.0, 5.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0], [0.0, 0.0, 0.0]]))


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 100) == pytest.approx(0.1 * 1.002)  # error clipped to +0.2
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(3.0, 100) == pytest.approx(0.1 * 0.998)  # error clipped to -0.2
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert ctl.update(6.6, 50) == pytest.approx(0.1 * (1 + 0.1 * 0.5))
    fixed = AdaptiveKLController(0.3)
    assert fixed.update(100.0, 1000) == 0.3 and not fixed.adaptive
    restored = AdaptiveKLController(0.1, target=6.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    with pytest.raises(ValueError, match="kl_target must be > 0"):
        AdaptiveKLController(0.1, target=0.0)
    with pytest.raises(ValueError, match="cannot start at 0"):
        AdaptiveKLController(0.0, target=1.0)


# ----------------------------------------------------------------------------- value head
def _tiny_batch(tok):
    prompt_ids = torch.tensor([[tok.pad_token_id, 10, 11], [12, 13, 14]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    completion_ids = torch.tensor([[20, 21, tok.eos_token_id], [22, tok.pad_token_id, tok.pad_token_id]])
    completion_mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def test_shared_backbone_gives_the_same_logprobs_and_values_of_the_right_shape():
    torch.manual_seed(0)
    model, tok = load_policy("tiny-llama")
    batch = _tiny_batch(tok)
    hidden = completion_hidden_states(model, *batch)
    assert hidden.shape == (2, 3, hidden_size_of(model)) and hidden_size_of(model) == 64
    logp, ent = logprobs_from_hidden(model, hidden, batch[2], batch[3], backend="reference")
    want_logp, want_ent = completion_logprobs(model, *batch, backend="reference")
    torch.testing.assert_close(logp, want_logp)
    torch.testing.assert_close(ent, want_ent)
    head = ValueHead(64)
    values = head(hidden)
    assert values.shape == (2, 3) and values.dtype == torch.float32
    assert values.abs().sum() == 0  # zero-initialised: values start at 0


def test_value_head_refuses_a_model_without_hidden_state_access():
    class Scorer(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

    with pytest.raises(TypeError, match="value head reads the final hidden states.*critic_model"):
        check_hidden_state_access(Scorer())
    with pytest.raises(TypeError, match="value head"):
        hidden_size_of(Scorer())


# ----------------------------------------------------------------------------- reward model
def _digits_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer unlike the policy's: specials, digits and space only."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in "0123456789 ":
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def _classifier(tok, num_labels=1):
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                                  num_labels=num_labels, pad_token_id=tok.pad_token_id)
    return AutoModelForSequenceClassification.from_config(config)


def test_reward_model_scores_the_last_token_of_prompt_plus_completion():
    torch.manual_seed(0)
    rm = RewardModel("tiny-llama", device="cpu", batch_size=2)
    prompts = ["What is 1 + 1?", [{"role": "user", "content": "Hi"}], "x"]
    completions = ["2", "Hello there", "a longer completion text"]
    scores = rm(prompts, completions)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    assert rm(prompts, completions) == pytest.approx(scores)  # deterministic (eval mode)
    for p, c, s in zip(prompts, completions, scores):  # alone, without padding: the same score
        ids = rm.tokenizer(rm.render(p, c), add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert rm.model(input_ids=ids).logits[0, 0].item() == pytest.approx(s, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 3
    total, per_fn = RewardSet([rm])(prompts, completions, {})  # usable as a GRPO/PPO reward function
    assert per_fn.shape == (3, 1) and total.tolist() == pytest.approx(scores, abs=1e-5)


def test_reward_model_refuses_more_than_one_label_and_a_missing_tokenizer():
    tok = char_tokenizer()
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardModel(_classifier(tok, num_labels=3), tokenizer=tok)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        RewardModel(_classifier(tok))


def test_reward_model_with_another_tokenizer_scores_retokenized_text():
    tok = _digits_tokenizer()
    rm = RewardModel(_classifier(tok), tokenizer=tok, device="cpu", chat_template=False, on_unknown="error")
    policy_tok = char_tokenizer()
    assert not rm.check_tokenizer(policy_tok)
    _, same_tok = tiny_reward_model()
    assert RewardModel("tiny-llama").check_tokenizer(same_tok)
    # the policy's token ids do not matter: the text is re-tokenized with the reward model's tokenizer
    a = rm(["1 2"], ["34"], completion_ids=[[1, 2, 3]])
    b = rm(["1 2"], ["34"], completion_ids=[policy_tok("34", add_special_tokens=False)["input_ids"]])
    assert a == b
    ids = tok("1 234", return_tensors="pt")["input_ids"]
    assert a[0] == pytest.approx(rm.model(input_ids=ids).logits[0, 0].item(), abs=1e-5)
    with pytest.raises(ValueError, match="tokenizer cannot encode.*on_unknown='ignore'"):
        rm(["1 2"], ["three"])
    rm.on_unknown = "warn"
    with pytest.warns(UserWarning, match="unknown tokens"):
        assert len(rm(["1 2"], ["three"])) == 1


def test_whiten_with_a_reduce_uses_the_statistics_of_every_process():
    """Two simulated ranks: each whitens its half with the other's sums added in, as an all-reduce does."""
    torch.manual_seed(0)
    x = torch.randn(6, 9) * 3 + 1
    mask = (torch.rand(6, 9) > 0.3).float()
    whole = whiten(x, mask)
    halves = [(x[:2], mask[:2]), (x[2:], mask[2:])]  # unequal shares, as uneven batches give

    def sums(xs, ms):
        m, xd = ms.double(), xs.double()
        return torch.stack([m.sum(), (xd * m).sum(), (xd * xd * m).sum()])

    for i, (xs, ms) in enumerate(halves):
        other = sums(*halves[1 - i])
        got = whiten(xs, ms, reduce=lambda t, other=other: t + other)
        rows = slice(0, 2) if i == 0 else slice(2, 6)
        torch.testing.assert_close(got, whole[rows], atol=1e-5, rtol=1e-5)
    alone = whiten(x[:2], mask[:2])  # without the reduce a rank whitens with its own statistics only
    assert not torch.allclose(alone, whole[:2], atol=1e-3)
