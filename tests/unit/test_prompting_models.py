"""Prompt rendering, tiny policies, LoRA, and completion log-probs (the HFEngine tests: tests/unit/rollout)."""

import copy

import pytest
import torch

from lightning_rl import load_policy
from lightning_rl.logprobs import completion_logprobs
from lightning_rl.lora import apply_lora, is_lora, lora_config
from lightning_rl.prompting import PromptTooLongError, encode_prompts, render_prompt
from lightning_rl.rollout.padding import left_pad, right_pad


@pytest.fixture(scope="module")
def tok():
    return load_policy("tiny-llama", {"num_hidden_layers": 1})[1]


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
    with pytest.raises(TypeError, match=r"invalid lora settings .*no field 'rank' \(did you mean 'r'\?\)"):
        lora_config({"rank": 4})
    with pytest.raises(TypeError, match=r"no field 'lora_alpah' \(did you mean 'lora_alpha'\?\)"):
        lora_config({"r": 4, "lora_alpah": 8})
    with pytest.raises(TypeError, match="mapping"):
        lora_config(4)
    assert apply_lora(model, None) is model
    with pytest.raises(ValueError, match=r"target_modules=\{'q_projj'\} names no layer of this model; its linear "
                                         r"layers are \['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj'"):
        apply_lora(load_policy("tiny-llama", {"num_hidden_layers": 1})[0], {"r": 4, "target_modules": ["q_projj"]})


def test_a_misspelled_lora_field_is_refused_when_the_module_is_built_before_any_model_loads(monkeypatch):
    import lightning_rl.modules.policy as policy_module
    from lightning_rl import GRPO

    monkeypatch.setattr(policy_module, "load_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(TypeError, match=r"no field 'alpha' \(did you mean 'lora_alpha'\?\)"):
        GRPO(reward_funcs=[len], model="tiny-llama", lora={"r": 4, "alpha": 8})


# ------------------------------------------------------------------------------ completion log-probs


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
