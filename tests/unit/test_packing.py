"""Sequences packed into one row (a prototype): the same log-probs and gradients as the padded layout on a CPU."""

import pytest
import torch

from lightning_rl.logprobs import (
    completion_hidden_states,
    completion_logprobs,
    packed_completion_hidden_states,
    packed_completion_logprobs,
)
from lightning_rl.packing import pack_lengths, pack_rows


def _batch(n=5, p=7, c=9, vocab=100, seed=0):
    """Left-padded prompts and right-padded completions of random lengths (the Rollout layout)."""
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(1, p + 1, (n,), generator=g)
    completion_len = torch.randint(1, c + 1, (n,), generator=g)
    prompt_mask = (torch.arange(p) >= p - prompt_len[:, None]).long()
    completion_mask = (torch.arange(c) < completion_len[:, None]).long()
    prompt_ids = torch.randint(1, vocab, (n, p), generator=g) * prompt_mask
    completion_ids = torch.randint(1, vocab, (n, c), generator=g) * completion_mask
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def test_packing_keeps_the_real_tokens_restarts_positions_and_points_at_each_completion_tokens_predictor():
    prompt_ids, prompt_mask, completion_ids, completion_mask = _batch()
    packed = pack_rows(prompt_ids, prompt_mask, completion_ids, completion_mask)
    lengths = (prompt_mask.sum(-1) + completion_mask.sum(-1)).tolist()
    assert packed.input_ids.shape == (1, sum(lengths)) and packed.max_len == max(lengths)
    assert packed.cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    flat, positions = packed.input_ids[0].tolist(), packed.position_ids[0].tolist()
    k = 0
    for i, length in enumerate(lengths):
        real = prompt_ids[i][prompt_mask[i].bool()].tolist() + completion_ids[i][completion_mask[i].bool()].tolist()
        assert flat[packed.cu_seqlens[i]:packed.cu_seqlens[i + 1]] == real
        assert positions[packed.cu_seqlens[i]:packed.cu_seqlens[i + 1]] == list(range(length))
        for t in range(int(completion_mask[i].sum())):  # the state before completion token t predicts it
            assert flat[packed.targets_at[k] + 1] == completion_ids[i, t]
            k += 1
    assert k == packed.targets_at.numel()
    with pytest.raises(ValueError, match="prompt without tokens"):
        pack_rows(prompt_ids, torch.zeros_like(prompt_mask), completion_ids, completion_mask)


@pytest.mark.parametrize("seed", range(4))
def test_packing_from_host_lengths_matches_the_masks_and_never_reads_the_ids_device(seed):
    """Each row's lengths in host memory give the masks' packing, index for index (empty completions included), and
    the ids are only gathered where they live: on the meta device (no data to read) the packing still runs."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = _batch(n=6, seed=seed)
    completion_mask[seed % 6] = 0  # a completion without tokens (an immediate stop)
    completion_ids = completion_ids * completion_mask
    lengths = prompt_mask.sum(-1), completion_mask.sum(-1)
    a = pack_rows(prompt_ids, prompt_mask, completion_ids, completion_mask)
    b = pack_rows(prompt_ids, prompt_mask, completion_ids, completion_mask, lengths)
    for field in ("input_ids", "position_ids", "cu_seqlens", "targets_at", "completion_rows"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=0, atol=0, msg=field)
    assert b.max_len == a.max_len and b.cu_seqlens.dtype == torch.int32
    assert a.completion_rows.tolist() == completion_mask.flatten().nonzero().flatten().tolist()
    meta = pack_lengths(prompt_ids.to("meta"), completion_ids.to("meta"), *lengths)
    assert meta.input_ids.device.type == "meta" and meta.input_ids.shape == a.input_ids.shape
    with pytest.raises(ValueError, match="prompt without tokens"):
        pack_lengths(prompt_ids, completion_ids, torch.zeros_like(lengths[0]), lengths[1])
    with pytest.raises(ValueError, match="do not fit"):
        pack_lengths(prompt_ids, completion_ids, lengths[0] + prompt_ids.shape[1], lengths[1])


@pytest.mark.parametrize("own", ["sdpa", "eager"])
def test_packed_logprobs_and_gradients_match_the_padded_layout(saved_tiny_llama, own):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(saved_tiny_llama(2), dtype=torch.float32, attn_implementation=own)
    model.train()
    batch = _batch(vocab=model.config.vocab_size)
    results = []
    for fn in (completion_logprobs, packed_completion_logprobs):
        model.zero_grad()
        logp, ent = fn(model, *batch, backend="reference")
        (logp.sum() + 0.1 * ent.sum()).backward()
        results.append((logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logp_a, ent_a, grads_a), (logp_b, ent_b, grads_b) = results
    assert (logp_a[batch[3] == 0] == 0).all() and (logp_b[batch[3] == 0] == 0).all()
    torch.testing.assert_close(logp_b, logp_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_b, ent_a, rtol=1e-5, atol=1e-5)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert model.config._attn_implementation == "lightning_rl_packed"  # stays: a checkpoint recomputes with it
    model.zero_grad()
    logp_c, _ = completion_logprobs(model, *batch, backend="reference")  # a padded forward: the model's own attention
    torch.testing.assert_close(logp_c, logp_a, rtol=0, atol=0)


def test_packed_hidden_states_match_the_padded_layouts_on_the_completion_tokens(saved_tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(saved_tiny_llama(2), dtype=torch.float32)
    batch = _batch(vocab=model.config.vocab_size)
    mask = batch[3].bool()
    padded = completion_hidden_states(model, *batch)
    packed = packed_completion_hidden_states(model, *batch, max_len=64)
    assert packed.shape == padded.shape and (packed[~mask] == 0).all()
    torch.testing.assert_close(packed[mask], padded[mask], rtol=1e-5, atol=1e-5)


def test_models_that_cannot_be_packed_are_named_and_refused_when_packing_is_asked_for(saved_tiny_llama):
    from helpers import tiny_grpo
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from lightning_rl.packing import packing_unsupported

    llama = AutoModelForCausalLM.from_pretrained(saved_tiny_llama(1), dtype=torch.float32)
    assert packing_unsupported(llama) is None
    windowed = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                            sliding_window=8, max_window_layers=0))
    assert "sliding_attention" in packing_unsupported(windowed)
    assert "not a transformers model" in packing_unsupported(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="pack_sequences must be None .*, True or False, got 'yes'"):
        tiny_grpo(saved_tiny_llama(1), pack_sequences="yes")
    asked, auto = tiny_grpo(saved_tiny_llama(1), pack_sequences=True), tiny_grpo(saved_tiny_llama(1))
    with pytest.raises(ValueError, match="pack_sequences=True, but .*sliding_attention.*pack_sequences=False"):
        asked.packs_sequences(windowed)
    assert not auto.packs_sequences(windowed) and not auto.packs_sequences(llama)  # None: CUDA only
    assert asked.packs_sequences(llama)  # True: a CPU too
