"""The vLLM engine's CPU-side parts: errors before vLLM starts, sizing, output parsing, the weights it is sent."""

import os
from types import SimpleNamespace

import pytest
import torch

from lightning_rl.lora import apply_lora
from lightning_rl.models import load_policy
from lightning_rl.prompting import PromptTooLongError
from lightning_rl.rollout import (
    EngineSettings,
    policy_weights,
    vllm_checks,
    vllm_internals,
    vllm_outputs,
    vllm_sizing,
)
from lightning_rl.rollout import vllm as vllm_mod


def test_vllm_missing_says_which_extra(monkeypatch):
    monkeypatch.setattr(vllm_internals, "_VLLM_AVAILABLE", False)
    model, _ = load_policy("tiny-llama")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-rl\[vllm\]'"):
        vllm_mod.VLLMEngine(model, [1], 0, 64)


def test_no_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(vllm_internals, "_VLLM_AVAILABLE", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, _ = load_policy("tiny-llama")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        vllm_mod.VLLMEngine(model, [1], 0, 64)


def test_unsupported_architecture_and_long_prompt_errors():
    with pytest.raises(vllm_checks.UnsupportedArchitectureError, match="model_impl"):
        vllm_checks.check_architecture("MyOwnForCausalLM", {"LlamaForCausalLM"})
    vllm_checks.check_architecture("LlamaForCausalLM", {"LlamaForCausalLM"})
    vllm_checks.check_architecture("MyOwnForCausalLM", set(), model_impl="transformers")
    with pytest.raises(PromptTooLongError, match="max_model_len is 8"):
        vllm_checks.check_prompt_lengths([[1] * 3, [1] * 8], 8)
    with pytest.raises(ValueError, match="VLLMProcessEngine needs at least one EOS token id"):
        vllm_checks.check_eos_ids([], "VLLMProcessEngine")
    vllm_checks.check_eos_ids([2], "VLLMEngine")


def test_execution_modes_map_to_vllm_arguments():
    assert vllm_sizing.execution_kwargs("eager") == {"enforce_eager": True}
    graphs = vllm_sizing.execution_kwargs("cuda_graphs")
    assert graphs["enforce_eager"] is False
    assert graphs["compilation_config"] == {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}  # no torch.compile
    assert vllm_sizing.execution_kwargs("compiled") == {"enforce_eager": False}  # vLLM's defaults


def test_bad_execution_mode_is_refused_before_vllm(vllm_and_cuda_pretended):
    model, tok = load_policy("tiny-llama")
    with pytest.raises(ValueError, match="execution must be one of"):
        vllm_mod.VLLMEngine(model, [tok.eos_token_id], tok.pad_token_id, 64,
                            settings=EngineSettings(execution="graphs"))


def test_sharing_base_weights_without_a_lora_adapter_is_refused_before_vllm(vllm_and_cuda_pretended):
    model, tok = load_policy("tiny-llama")
    with pytest.raises(ValueError, match="share_base_weights=True needs a LoRA policy"):
        vllm_mod.VLLMEngine(model, [tok.eos_token_id], tok.pad_token_id, 64,
                            settings=EngineSettings(share_base_weights=True))


def test_sampled_logprobs_from_flat_and_dict_formats():
    flat = SimpleNamespace(start_indices=[0, 1, 2], token_ids=[5, 9, 2], logprobs=[-0.5, -1.25, -3.0])
    assert vllm_outputs.sampled_logprobs(flat, [5, 9, 2]) == [-0.5, -1.25, -3.0]
    with pytest.raises(RuntimeError, match="sampled token 7"):
        vllm_outputs.sampled_logprobs(flat, [5, 7, 2])
    dicts = [{5: SimpleNamespace(logprob=-0.5)}, {9: SimpleNamespace(logprob=-1.25)}]
    assert vllm_outputs.sampled_logprobs(dicts, [5, 9]) == [-0.5, -1.25]
    assert vllm_outputs.sampled_logprobs(None, [5, 9]) == [0.0, 0.0]


def test_kv_cache_budget_from_rollout_shape():
    model, _ = load_policy("tiny-llama")  # 2 layers, 2 KV heads, head dim 16
    per_token = 2 * 2 * 2 * 16 * 2  # K and V, bf16
    got = vllm_sizing.kv_cache_bytes_for(model.config, 16, 8, 100, 128, torch.bfloat16, headroom=1.0)
    assert got == (16 * 100 + 128 * (128 + 16)) * per_token
    unshared = vllm_sizing.kv_cache_bytes_for(model.config, 16, 8, 100, 128, torch.bfloat16, 1.0, shared_prompts=False)
    assert unshared == (128 * 100 + 128 * (128 + 16)) * per_token
    assert vllm_sizing.kv_cache_bytes_for(model.config, 1, 1, 10, 10, torch.float32, 1.5) >= 36 * per_token * 2


def test_a_tensor_parallel_shard_holds_its_share_of_weights_and_kv_for_the_groups_prompts():
    model, _ = load_policy("tiny-llama")  # 2 layers, 2 KV heads, head dim 16
    per_rank = 2 * 2 * 1 * 16 * 2  # one of the 2 KV heads per shard
    got = vllm_sizing.kv_cache_bytes_for(model.config, 16, 8, 100, 128, torch.bfloat16, headroom=1.0,
                                         tensor_parallel_size=2)
    assert got == (32 * 100 + 256 * (128 + 16)) * per_rank  # the group's 2 x 16 prompts, half the heads
    replicated = vllm_sizing.kv_cache_bytes_for(model.config, 16, 8, 100, 128, torch.bfloat16, headroom=1.0,
                                                tensor_parallel_size=4)
    assert replicated == (64 * 100 + 512 * (128 + 16)) * per_rank  # 2 KV heads on 4 shards: one head each
    full = vllm_sizing.engine_weight_bytes(model, "bfloat16")
    assert full == sum(p.numel() for p in model.parameters()) * 2
    assert vllm_sizing.engine_weight_bytes(model, "bfloat16", tensor_parallel_size=2) == -(-full // 2)


@pytest.mark.parametrize("targets", [None, ["q_proj", "embed_tokens"]], ids=["all-linear", "with-embedding"])
def test_lora_weights_for_the_engine(targets):
    torch.manual_seed(0)
    base, _ = load_policy("tiny-llama")
    peft = apply_lora(base, {"r": 4, "lora_alpha": 8, **({"target_modules": targets} if targets else {})})
    for name, p in peft.named_parameters():
        if "lora_B" in name or "lora_embedding_A" in name:  # peft starts these at zero: the delta would be too
            torch.nn.init.normal_(p, std=0.1)
    assert policy_weights.adapter_sync_unsupported_reason(peft) is None
    # copies: a weight without a delta is the base's own tensor, which merge_and_unload merges into in place
    merged = {k: v.clone() for k, v in policy_weights.merged_lora_weights(peft)}
    reference = {k: v for k, v in peft.merge_and_unload(progressbar=False).state_dict().items()}
    assert set(merged) == {k for k in reference if k != "lm_head.weight"}  # tied head: not a parameter
    for k, v in merged.items():
        torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-6)


def test_lora_base_and_adapter_tensors():
    base, _ = load_policy("tiny-llama")
    plain = dict(policy_weights.full_weights(base))
    peft = apply_lora(base, {"r": 4, "lora_alpha": 8})
    assert set(dict(policy_weights.base_weights(peft))) == set(plain)
    tensors, config = policy_weights.adapter_tensors(peft)
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)
    assert config["r"] == 4 and config["lora_alpha"] == 8
    dora = apply_lora(load_policy("tiny-llama")[0], {"r": 4, "use_dora": True})
    assert "DoRA" in policy_weights.adapter_sync_unsupported_reason(dora)


def test_engine_settings_are_checked_when_built():
    for bad, match in (({"sleep_level": 3}, "sleep_level"), ({"lora_sync": "both"}, "lora_sync"),
                       ({"dtype": "int8"}, "dtype"), ({"kv_cache_headroom": 0.5}, "headroom"),
                       ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization")):
        with pytest.raises(ValueError, match=match):
            EngineSettings(**bad)


def test_the_launcher_variables_are_set_only_while_vllm_starts(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("RANK", raising=False)
    with vllm_internals._environment({"LOCAL_RANK": "3", "RANK": "1"}):
        assert (os.environ["LOCAL_RANK"], os.environ["RANK"]) == ("3", "1")
    assert os.environ["LOCAL_RANK"] == "0" and "RANK" not in os.environ  # Lightning reads its own LOCAL_RANK again
