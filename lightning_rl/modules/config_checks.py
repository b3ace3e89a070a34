"""Checks of constructor arguments shared by the modules: a bad value is refused at once, naming the fix."""

from __future__ import annotations

import math

from lightning_rl.whole_numbers import is_whole_number


def check_optimizer_settings(weight_decay: float, max_grad_norm: float | None) -> None:
    """Refuse a negative or non-finite ``weight_decay`` and a ``max_grad_norm`` that would not clip."""
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0 (AdamW's decoupled decay; 0 turns it off), got {weight_decay}")
    if max_grad_norm is not None and (math.isnan(max_grad_norm) or max_grad_norm < 0):
        raise ValueError(f"max_grad_norm must be > 0 to clip the gradient norm to it, or None (or 0) to turn "
                         f"clipping off; got {max_grad_norm}")


def check_clip_range(epsilon: float, epsilon_high: float | None) -> None:
    """``epsilon_high`` (DAPO's clip-higher) must not be below ``epsilon``."""
    if epsilon_high is not None and epsilon_high < epsilon:
        raise ValueError(
            f"epsilon_high ({epsilon_high}) is below epsilon ({epsilon}): it is the upper clip range of the ratio "
            "(DAPO's clip-higher, e.g. 0.28 with epsilon=0.2); set it >= epsilon, or leave it None to clip "
            "symmetrically at epsilon"
        )


def check_step_limit(name: str, value: int, minimum: int) -> None:
    """A count (steps in a row, tokens) that must be an integer >= ``minimum``."""
    if not is_whole_number(value, minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_one_optimizer(optimizer: object, learning_rate: float, weight_decay: float, default_lr: float) -> None:
    """Refuse an explicit ``optimizer`` together with a changed ``learning_rate`` or ``weight_decay``.

    Those two configure the default AdamW; an optimizer given as a callable carries its own, so
    accepting both would silently drop one of them.
    """
    if optimizer is None or (learning_rate == default_lr and weight_decay == 0.0):
        return
    changed = [f"{n}={v}" for n, v, d in (("learning_rate", learning_rate, default_lr),
                                         ("weight_decay", weight_decay, 0.0)) if v != d]
    raise ValueError(
        f"learning_rate and weight_decay apply to the default AdamW optimizer only (got {', '.join(changed)}), but an "
        "optimizer was given too: set the "
        "learning rate and weight decay in the optimizer instead (Python: optimizer=functools.partial("
        "torch.optim.AdamW, lr=..., weight_decay=...); YAML: optimizer: {class_path: torch.optim.AdamW, "
        "init_args: {lr: ..., weight_decay: ...}}), or leave optimizer unset"
    )


def check_trainer_settings(accumulate_grad_batches: int, gradient_clip_val: float | None) -> None:
    """Refuse the Trainer settings of automatic optimization, naming what these modules take instead.

    The modules optimize manually (a rollout, then their own micro-batches and optimizer steps), where
    Lightning refuses both settings with advice to switch to automatic optimization, which they cannot.
    """
    if accumulate_grad_batches != 1:
        raise ValueError(
            f"Trainer(accumulate_grad_batches={accumulate_grad_batches}) does not apply to lightning-rl's modules: "
            "each training batch is one rollout whose micro-batches' gradients add up into its optimizer steps "
            "already. Remove it; for more completions per optimizer step raise the data module's batch_size (or "
            "num_generations), and set micro_batch_size to bound the memory of one forward"
        )
    if gradient_clip_val is not None and gradient_clip_val > 0:
        raise ValueError(
            f"Trainer(gradient_clip_val={gradient_clip_val}) does not apply to lightning-rl's modules (they clip in "
            f"their own optimizer steps): remove it and pass max_grad_norm={gradient_clip_val} to the module"
        )


def steps_overshoot(max_steps: int, steps_per_batch: int) -> int | None:
    """The step a run stops at when ``max_steps`` is not a multiple of the optimizer steps of one batch, else None.

    The Trainer counts optimizer steps and checks ``max_steps`` only between training batches.
    """
    if max_steps <= 0 or steps_per_batch <= 1 or max_steps % steps_per_batch == 0:
        return None
    return math.ceil(max_steps / steps_per_batch) * steps_per_batch
