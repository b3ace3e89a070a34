"""RewardModel: scores the last token of prompt + completion, re-tokenizes for its own tokenizer, refuses bad models."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerFast

from lightning_rl.rewards import RewardModel, RewardSet
from lightning_rl.rewards.reward_model import tiny_reward_model
from lightning_rl.tokenizer import SPECIAL_TOKENS, char_tokenizer


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
