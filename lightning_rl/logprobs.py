"""The one path from a causal LM to per-token log-probs and entropy of its completions.

The model's backbone gives final hidden states; the LM head and the targets go to a fused
function (the Triton kernel on CUDA, the chunked pure-torch reference elsewhere), so the full
``[tokens, vocab]`` logits are never held at once.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import nn

from lightning_rl.early_gradients import handed_off
from lightning_rl.kernels.reference import IGNORE_INDEX, token_logprobs_entropy_reference
from lightning_rl.models import (  # unwrap re-exported: the modules import it from here until they move
    backbone_output,
    unwrap,
)

Backend = Literal["auto", "triton", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "reference")
#: Config fields with which a model post-processes its LM head's output (Gemma-2/3n/4 softcapping, Cohere's scale,
#: Granite's ``logits_scaling`` divisor, Falcon-H1's ``lm_head_multiplier``): the fused path computes raw head logits.
_UNSUPPORTED_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling",
                           "lm_head_multiplier")


def _triton_fn():
    try:
        from lightning_rl.kernels.triton_logprobs import token_logprobs_entropy_triton
    except ImportError:
        return None
    return token_logprobs_entropy_triton


def resolve_backend(backend: Backend, device: torch.device) -> str:
    """Pick ``triton`` or ``reference``; ``auto`` takes Triton on CUDA when it is importable.

    The environment variable ``LIGHTNING_RL_LOGPROB_BACKEND`` overrides ``auto``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"logprob backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("LIGHTNING_RL_LOGPROB_BACKEND", "auto")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_fn() is not None else "reference"
    if backend == "triton" and _triton_fn() is None:
        raise ModuleNotFoundError("logprob backend 'triton' needs triton: pip install 'lightning-rl[triton]'")
    return backend


def token_logprobs_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    backend: Backend = "auto",
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(target)`` and entropy per row of ``hidden`` (see ``lightning_rl.kernels``).

    Under autocast the Triton kernel takes its matrix inputs in the autocast dtype (fp32 master weights
    are cast once per call, hidden states too) and accumulates in fp32: the speed of bf16 weights,
    with dW returned in the weight's own dtype. The reference path always computes in fp32.
    """
    if resolve_backend(backend, hidden.device) == "triton":
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type) and hidden.dtype == torch.float32:
            hidden = hidden.to(torch.get_autocast_dtype(device_type))
        return _triton_fn()(hidden, weight, targets, bias=bias, temperature=temperature)
    return token_logprobs_entropy_reference(hidden, weight, targets, bias, temperature, chunk_size)


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split a causal LM into the module giving final hidden states and its LM head."""
    inner = unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    prefix = getattr(inner, "base_model_prefix", None)
    body = getattr(inner, prefix, None) if prefix else None
    if head is None or body is None or body is inner:
        raise TypeError(
            f"{type(inner).__name__} does not expose a backbone and an LM head "
            "(get_output_embeddings() and base_model_prefix); use a transformers *ForCausalLM model"
        )
    config = getattr(inner, "config", None)
    configs = [config]
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text_config is not None and text_config is not config:  # multimodal LMs keep it there (Gemma-3n, Gemma-4)
        configs.append(text_config)
    for cfg in configs:
        for attr in _UNSUPPORTED_HEAD_ATTRS:
            value = getattr(cfg, attr, None)
            if value not in (None, 1, 1.0, 0, 0.0):
                raise NotImplementedError(
                    f"{type(inner).__name__} post-processes its logits ({attr}={value}), which the fused "
                    "log-prob path does not apply yet; open an issue with the model name"
                )
    return body, head


def completion_hidden_states(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Final hidden states ``[N, C, H]``; row ``t`` is the state that predicts completion token ``t``.

    Prompts are left-padded, completions right-padded (the :class:`~lightning_rl.rollout.Rollout`
    layout). Positions follow the attention mask, as in ``generate``, so the values match the ones
    the sampler saw.

    One padding column is appended after the completions (masked, after every token, so no value changes):
    a batch without any padding would otherwise reach the decoder layers without an attention mask (transformers
    then uses a causal kernel), and the compiled layers (:mod:`lightning_rl.compiled_layers`) would compile a
    second graph the first time that batch shape turns up (15 s for a Qwen2.5-0.5B shape on an H200).
    """
    body, _ = backbone_and_head(model)
    pad = completion_ids.new_zeros((completion_ids.shape[0], 1))
    input_ids = torch.cat([prompt_ids, completion_ids, pad], dim=1)
    attention = torch.cat([prompt_mask, completion_mask, pad.to(completion_mask.dtype)], dim=1)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=False)
    out = backbone_output(model, body, inputs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    p, c = prompt_ids.shape[1], completion_ids.shape[1]
    return hidden[:, p - 1 : p + c - 1]


def logprobs_from_hidden(
    model: nn.Module,
    hidden: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    backend: Backend = "auto",
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob and entropy ``[N, C]`` from :func:`completion_hidden_states` (0 on padding).

    Only the unmasked tokens go through ``model``'s LM head (fused: no full logits).
    """
    _, head = backbone_and_head(model)
    rows = completion_mask.bool().flatten().nonzero().squeeze(-1)
    states = hidden.reshape(-1, hidden.shape[-1])[rows]
    return _scattered_logprobs(model, head, states, completion_ids, rows, temperature, backend, chunk_size)


def head_weight_for_kernel(model: nn.Module, head: nn.Module) -> torch.Tensor:
    """``head``'s weight as the log-prob kernel takes it: handed off (:mod:`lightning_rl.early_gradients`) when it is
    also ``model``'s input embedding.

    A tied weight's gradient has two parts, the head's first in the backward and the embedding's last; a sink on the
    weight (gradients sent to host memory) then takes the head's part at once instead of autograd holding it through
    every layer's backward. An untied head's gradient is whole when the kernel makes it: it stays autograd's.
    """
    inner = unwrap(model)
    embeddings = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    tied = embeddings is not None and getattr(embeddings, "weight", None) is head.weight
    return handed_off(head.weight) if tied else head.weight


def _scattered_logprobs(
    model: nn.Module, head: nn.Module, states: torch.Tensor, completion_ids: torch.Tensor, rows: torch.Tensor,
    temperature: float, backend: Backend, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy ``[N, C]`` of the tokens ``completion_ids.flatten()[rows]`` (0 elsewhere).

    ``states`` ``[n, H]`` are the hidden states that predict those tokens; only they go through ``head`` (fused: no
    full logits).
    """
    logp_sel, ent_sel = token_logprobs_entropy(
        states, head_weight_for_kernel(model, head), completion_ids.flatten()[rows], getattr(head, "bias", None),
        temperature, backend, chunk_size,
    )
    logp = torch.zeros(completion_ids.numel(), dtype=logp_sel.dtype, device=logp_sel.device).index_put(
        (rows,), logp_sel)
    ent = torch.zeros_like(logp).index_put((rows,), ent_sel)
    return logp.view_as(completion_ids), ent.view_as(completion_ids)


def completion_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    backend: Backend = "auto",
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy of every completion token under ``model``.

    Returns:
        ``(logp, entropy)``, each ``[N, C]`` float32, 0 where ``completion_mask`` is 0.
    """
    hidden = completion_hidden_states(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    return logprobs_from_hidden(model, hidden, completion_ids, completion_mask, temperature, backend, chunk_size)


def packed_completion_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    backend: Backend = "auto",
    chunk_size: int = 1024,
    max_len: int | None = None,
    lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`completion_logprobs` with the sequences packed in one row without padding (:mod:`~lightning_rl.packing`).

    ``max_len`` bounds a sequence's length for the attention kernel; a bound fixed for the run (the longest prompt
    plus ``max_new_tokens``) keeps compiled layers from recompiling when a rollout's longest sequence changes.
    ``lengths``, each row's prompt and completion lengths in host memory, packs without reading the device
    (:func:`~lightning_rl.packing.pack_lengths`). The same values as :func:`completion_logprobs` (CPU tests; within
    bf16 rounding on a GPU).
    """
    states, rows = _packed_completion_states(model, prompt_ids, prompt_mask, completion_ids, completion_mask, max_len,
                                             lengths)
    _, head = backbone_and_head(model)
    return _scattered_logprobs(model, head, states, completion_ids, rows, temperature, backend, chunk_size)


def packed_completion_hidden_states(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    max_len: int | None = None,
    lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`completion_hidden_states` from one packed forward: ``[N, C, H]``, zero where ``completion_mask`` is 0.

    For a value head on the policy's backbone (PPO): the states of the real tokens equal the padded layout's
    (``max_len`` and ``lengths`` as in :func:`packed_completion_logprobs`); :func:`logprobs_from_hidden` reads only
    those.
    """
    states, rows = _packed_completion_states(model, prompt_ids, prompt_mask, completion_ids, completion_mask, max_len,
                                             lengths)
    out = states.new_zeros((completion_ids.numel(), states.shape[-1])).index_put((rows,), states)
    return out.view(*completion_ids.shape, states.shape[-1])


def _packed_completion_states(
    model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
    completion_mask: torch.Tensor, max_len: int | None, lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One packed forward: the final hidden states ``[n, H]`` that predict the real completion tokens.

    Returned with those tokens' indices ``[n]`` in ``completion_ids.flatten()``.
    """
    from lightning_rl.packing import pack_rows, packed_forward, use_packed_attention

    packed = pack_rows(prompt_ids, prompt_mask, completion_ids, completion_mask, lengths)
    bound = packed.max_len if max_len is None else max(max_len, packed.max_len)
    body, _ = backbone_and_head(model)
    use_packed_attention(model)
    hidden = packed_forward(model, body, packed, bound)
    return hidden[packed.targets_at], packed.completion_rows


__all__ = [
    "IGNORE_INDEX",
    "completion_hidden_states",
    "completion_logprobs",
    "head_weight_for_kernel",
    "logprobs_from_hidden",
    "packed_completion_hidden_states",
    "packed_completion_logprobs",
    "resolve_backend",
    "token_logprobs_entropy",
]
