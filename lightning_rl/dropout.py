"""Dropout off in a pretrained model: the update then scores tokens as the rollout engine sampled them.

An on-policy update divides the policy's log-probs by those of the rollout (the engine's, or a no-grad pass before the
first optimizer step) and adds a KL to a reference in eval mode. With dropout active in the update's train mode, the
ratio differs from 1 and the KL from 0 before any weight has moved, so clipping and the KL term act on dropout's noise
(the preference losses likewise compare a dropped-out policy with a reference that is not). Decoder models are
pretrained without dropout anyway: most configs ship 0.0, and the few that do not (GPT-2's 0.1) drop activations
that the rollout never dropped.
"""

from __future__ import annotations

from torch import nn

#: Submodule names whose dropout a user asked for in this library's own settings (peft's ``lora_dropout``).
_KEPT = ("lora_dropout",)


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability of ``model`` to 0, in place; returns how many were above 0.

    Covers ``nn.Dropout`` modules (and the other ``nn`` dropout layers) and the float attributes whose name contains
    ``dropout`` that attention modules pass to their kernels (``attention_dropout`` in Llama, Qwen2, Mistral, ...).
    LoRA's own ``lora_dropout`` is left as the LoRA settings chose it. The model's config is not changed, so a
    saved model keeps the dropout it was loaded with.
    """
    changed = 0
    for name, module in model.named_modules():
        if any(part in _KEPT for part in name.split(".")):
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd):
            changed += module.p > 0
            module.p = 0.0
            continue
        for attr, value in vars(module).items():
            if "dropout" in attr and isinstance(value, float) and value > 0:
                setattr(module, attr, 0.0)
                changed += 1
    return changed


__all__ = ["disable_dropout"]
