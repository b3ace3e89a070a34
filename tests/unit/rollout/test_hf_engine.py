"""HFEngine (transformers generate): the rollout layout, its log-probs, greedy sampling, errors; the padding helpers."""

import pytest
import torch

from lightning_rl import HFEngine, SamplingConfig, load_policy
from lightning_rl.logprobs import completion_logprobs
from lightning_rl.rollout.padding import completion_mask_and_reasons, left_pad, right_pad


def test_padding_helpers():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = right_pad([[5, 6], []], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 0]] and mask.tolist() == [[1, 1], [0, 0]]


def test_completion_mask_up_to_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0], [5, 9, 6, 3]])
    mask, reasons = completion_mask_and_reasons(ids, [2, 3])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert reasons == ["stop", "length", "stop", "stop"]


def _check_layout(rollout, prompts, g, eos, pad, max_new):
    n = len(prompts) * g
    p_width = max(len(p) for p in prompts)
    assert rollout.prompt_ids.shape == rollout.prompt_mask.shape == (n, p_width)
    assert rollout.completion_ids.shape == rollout.completion_mask.shape == rollout.sampling_logprobs.shape
    assert rollout.completion_ids.shape[0] == n and rollout.completion_ids.shape[1] <= max_new
    assert rollout.group_index.tolist() == [i for i in range(len(prompts)) for _ in range(g)]
    for row in range(n):
        prompt = prompts[row // g]
        assert rollout.prompt_ids[row, p_width - len(prompt) :].tolist() == prompt  # left padded
        assert rollout.prompt_mask[row].tolist() == [0] * (p_width - len(prompt)) + [1] * len(prompt)
        ids = rollout.completion_ids[row].tolist()
        m = rollout.completion_mask[row].tolist()
        if eos in ids:
            first = ids.index(eos)
            assert rollout.finish_reasons[row] == "stop"
            assert m == [1] * (first + 1) + [0] * (len(ids) - first - 1)
            assert all(t == pad for t in ids[first + 1 :])
        else:
            assert rollout.finish_reasons[row] == "length"
            assert m == [1] * max_new and len(ids) == max_new
        lp = rollout.sampling_logprobs[row]
        assert (lp[torch.tensor(m) == 0] == 0).all() and (lp[torch.tensor(m) == 1] < 0).all()
    assert rollout.truncated.tolist() == [r == "length" for r in rollout.finish_reasons]


@pytest.mark.parametrize("max_batch_size", [64, 4])
def test_hf_engine_layout_and_logprobs(qwen, max_batch_size):
    model, tok = qwen
    prompts = [tok("abc")["input_ids"], tok("hello there")["input_ids"]]
    engine = HFEngine(model, tok.pad_token_id, [tok.eos_token_id], max_batch_size=max_batch_size)
    torch.manual_seed(0)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.7)
    rollout = engine.generate(prompts, sampling, num_generations=6)
    _check_layout(rollout, prompts, 6, tok.eos_token_id, tok.pad_token_id, 8)
    reasons = set(rollout.finish_reasons)
    assert reasons == {"stop", "length"}, "the EOS bias should give both finish reasons"
    assert model.training is False

    # the engine's sampling log-probs are the model's temperature-scaled log-probs of the same tokens
    logp, ent = completion_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                    rollout.completion_mask, temperature=0.7, backend="reference")
    torch.testing.assert_close(logp, rollout.sampling_logprobs, rtol=0, atol=1e-4)
    assert (ent[rollout.completion_mask == 1] > 0).all()


def test_hf_engine_top_k_log_probs_are_those_of_the_truncated_distribution(qwen):
    model, tok = qwen
    engine = HFEngine(model, tok.pad_token_id, [tok.eos_token_id])
    torch.manual_seed(0)
    rollout = engine.generate([tok("abc")["input_ids"]], SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=5),
                              num_generations=4)
    full, _ = completion_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                  rollout.completion_mask, temperature=0.7, backend="reference")
    # the sampled token's log-prob renormalized over the 5 most likely tokens, as vLLM's processed log-probs are
    with torch.no_grad():
        ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
        mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, rollout.prompt_ids.shape[1] - 1 : -1].float()
        kept = torch.log_softmax(logits / 0.7, -1).topk(5, -1).values.logsumexp(-1)
    m = rollout.completion_mask.bool()
    torch.testing.assert_close(rollout.sampling_logprobs[m], (full - kept)[m], rtol=0, atol=1e-4)
    assert (rollout.sampling_logprobs[m] > full[m]).all()


def test_hf_engine_samples_without_the_models_generation_defaults():
    model, tok = load_policy("tiny-llama", {"num_hidden_layers": 1})
    eos = tok.eos_token_id
    # a hub model's generation_config.json: here one that would allow nothing but EOS
    model.generation_config.suppress_tokens = [i for i in range(model.config.vocab_size) if i != eos]
    model.generation_config.repetition_penalty = 1.3
    engine = HFEngine(model, tok.pad_token_id, [eos])
    torch.manual_seed(0)
    rollout = engine.generate([tok("7+1=")["input_ids"]], SamplingConfig(max_new_tokens=6), num_generations=4)
    assert (rollout.completion_ids[:, 0] != eos).any()  # sampled from temperature, top-k and top-p only
    full, _ = completion_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                  rollout.completion_mask, temperature=1.0, backend="reference")
    torch.testing.assert_close(rollout.sampling_logprobs, full * rollout.completion_mask, rtol=0, atol=1e-4)
    assert model.generation_config.repetition_penalty == 1.3 and len(model.generation_config.suppress_tokens) > 1


def test_hf_engine_greedy_is_deterministic_and_restores_train_mode():
    model, tok = load_policy("tiny-llama", {"num_hidden_layers": 1})
    model.train()
    engine = HFEngine(lambda: model, tok.pad_token_id, [tok.eos_token_id])
    prompts = [tok("7+1=")["input_ids"]]
    a = engine.generate(prompts, SamplingConfig(max_new_tokens=5, temperature=0.0), num_generations=2)
    b = engine.generate(prompts, SamplingConfig(max_new_tokens=5, temperature=0.0), num_generations=1)
    assert torch.equal(a.completion_ids[0], a.completion_ids[1])
    assert torch.equal(a.completion_ids[:1], b.completion_ids)
    assert model.training is True


def test_hf_engine_errors():
    model, tok = load_policy("tiny-llama", {"num_hidden_layers": 1})
    with pytest.raises(ValueError, match="at least one EOS"):
        HFEngine(model, 0, [])
    engine = HFEngine(model, tok.pad_token_id, [tok.eos_token_id])
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[5], []], SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="num_generations must be >= 1"):
        engine.generate([[5]], SamplingConfig(max_new_tokens=2), num_generations=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
