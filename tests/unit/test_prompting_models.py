"""Prompt rendering, tiny policies, LoRA, the HFEngine rollout layout, and completion log-probs."""

import copy

import pytest
import torch

from lightning_rl import HFEngine, SamplingConfig, load_policy
from lightning_rl.logprobs import completion_logprobs
from lightning_rl.lora import apply_lora, is_lora, lora_config
from lightning_rl.prompting import PromptTooLongError, encode_prompts, render_prompt
from lightning_rl.rollout.padding import completion_mask_and_reasons, left_pad, right_pad


@pytest.fixture(scope="module")
def tok():
    return load_policy("tiny-llama", {"num_hidden_layers": 1})[1]


@pytest.fixture(scope="module")
def qwen():
    """tiny-qwen2 (untied head) with an LM-head bias that makes EOS likely, so rollouts both stop and
    run to the length limit."""
    torch.manual_seed(0)
    model, tok = load_policy("tiny-qwen2")
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 2.5
    model.lm_head = head
    return model.eval(), tok


# ------------------------------------------------------------------------------ prompting


def test_render_chat_and_plain(tok):
    assert render_prompt(tok, "hi") == "<|user|>hi<|assistant|>"
    assert render_prompt(tok, "hi", system_prompt="be brief") == "<|system|>be brief<|user|>hi<|assistant|>"
    assert render_prompt(tok, "hi", chat=False) == "hi"
    assert render_prompt(tok, "hi", system_prompt="S", chat=False) == "S\n\nhi"
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    # messages always use the template; an existing system message is not doubled
    assert render_prompt(tok, msgs, system_prompt="other", chat=False) == "<|system|>S<|user|>q<|assistant|>"


def test_messages_without_chat_template(tok):
    no_template = copy.deepcopy(tok)
    no_template.chat_template = None
    assert render_prompt(no_template, "hi") == "hi"  # plain text falls back to itself
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(no_template, [{"role": "user", "content": "hi"}])


def test_encode_prompts(tok):
    (chat_ids,) = encode_prompts(tok, ["ab"])
    assert tok.convert_ids_to_tokens(chat_ids) == ["<|user|>", "a", "b", "<|assistant|>"]
    (plain,) = encode_prompts(tok, ["ab"], chat=False)
    assert tok.convert_ids_to_tokens(plain) == ["a", "b"]


def test_prompt_too_long_error_and_truncation(tok):
    with pytest.raises(PromptTooLongError) as info:
        encode_prompts(tok, ["ok", "hello world"], chat=False, max_prompt_length=5)
    msg = str(info.value)
    assert "prompt 1 has 11 tokens" in msg and "max_prompt_length=5" in msg and "truncate_prompts=True" in msg
    assert isinstance(info.value, ValueError)
    _, cut = encode_prompts(tok, ["ok", "hello world"], chat=False, max_prompt_length=5, truncate=True)
    assert tok.decode(cut) == "world"


# ------------------------------------------------------------------------------ models and LoRA


@pytest.mark.parametrize(("name", "tied"), [("tiny-llama", True), ("tiny-qwen2", False)])
def test_load_tiny_policies(name, tied):
    model, tok = load_policy(name, {"num_hidden_layers": 1})
    assert model.config.vocab_size == len(tok)
    assert model.config.num_hidden_layers == 1
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert tok.padding_side == "left" and tok.pad_token_id is not None and tok.eos_token_id is not None
    assert next(model.parameters()).dtype == torch.float32
    out = model(torch.tensor([[1, 5, 6]])).logits
    assert out.shape == (1, 3, len(tok)) and torch.isfinite(out).all()


def test_load_policy_errors_and_dtype(tmp_path):
    model, _ = load_policy("tiny-llama", {"num_hidden_layers": 1}, dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_policy("tiny-llama", dtype="int8")
    with pytest.raises(ValueError, match="model_config overrides only apply to the tiny models"):
        load_policy(str(tmp_path), {"num_hidden_layers": 1})
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_policy(str(tmp_path / "nope.gguf"))


def test_lora_from_a_mapping_trains_only_adapters():
    model, _ = load_policy("tiny-llama", {"num_hidden_layers": 1})
    n_base = sum(p.numel() for p in model.parameters())
    wrapped = apply_lora(model, {"r": 4, "lora_alpha": 8})
    assert is_lora(wrapped) and not is_lora(model.__class__)
    trainable = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    frozen = [n for n, p in wrapped.named_parameters() if not p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lora_" in n for n in frozen)
    assert sum(p.numel() for p in trainable.values()) < n_base / 5
    # every linear layer of the block got an adapter (all-linear by default)
    assert any("q_proj.lora_A" in n for n in trainable) and any("down_proj.lora_B" in n for n in trainable)
    cfg = lora_config({"r": 4})
    assert cfg.r == 4 and cfg.lora_alpha == 32 and str(cfg.task_type).endswith("CAUSAL_LM")
    with pytest.raises(TypeError, match="invalid lora settings"):
        lora_config({"rank": 4})
    with pytest.raises(TypeError, match="mapping"):
        lora_config(4)
    assert apply_lora(model, None) is model


# ------------------------------------------------------------------------------ rollouts


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


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_completion_logprobs_match_dense_logits_with_left_padding(qwen, temperature):
    model, tok = qwen
    prompts = [[7, 8, 9, 10, 11], [12, 13], [14, 15, 16]]
    completions = [[20, 21, 22, 2], [23, 24, 25, 26], [27, 2]]
    p_ids, p_mask = left_pad(prompts, tok.pad_token_id)
    c_ids, c_mask = right_pad(completions, tok.pad_token_id)
    logp, ent = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, temperature=temperature,
                                    backend="reference", chunk_size=3)
    assert logp.shape == c_ids.shape and logp.dtype == torch.float32
    assert (logp[c_mask == 0] == 0).all() and (ent[c_mask == 0] == 0).all()

    # dense reference: the full logits, one unpadded sequence at a time
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(ids).logits[0, len(p) - 1 : len(p) + len(c) - 1].float() / temperature
        lsm = torch.log_softmax(logits, -1)
        want = lsm.gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        want_ent = -(lsm.exp() * lsm).sum(-1)
        torch.testing.assert_close(logp[i, : len(c)], want, rtol=0, atol=1e-5)
        torch.testing.assert_close(ent[i, : len(c)], want_ent, rtol=0, atol=1e-5)

    # and gradients flow to the weights
    model.zero_grad()
    lp, _ = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, temperature=temperature, backend="reference")
    lp.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad()
