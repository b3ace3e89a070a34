"""The embedded default rollout engine: transformers ``generate`` on the policy itself."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from transformers import GenerationConfig

from lightning_rl.rollout.engine import Rollout, SamplingConfig
from lightning_rl.rollout.padding import completion_mask_and_reasons, left_pad

#: Held while a ``generate`` call runs with the model's own generation config set aside (see :func:`sampling_only`).
_GENERATE_LOCK = threading.Lock()


@contextmanager
def sampling_only(model: nn.Module) -> Generator[None, None, None]:
    """Run ``generate`` on ``model`` with none of its ``generation_config``'s defaults.

    transformers fills every field a passed config leaves unset from the model's ``generation_config`` (a hub
    model's ``repetition_penalty``, ``min_p``, ``suppress_tokens``, ...). Those would change the distribution tokens
    are sampled from while the rollout's log-probs and the loss describe only temperature, top-k and top-p, as
    vLLM samples. So the model's configs are replaced by blank ones for the call (one call at a time).
    """
    owners = [m for m in model.modules() if isinstance(getattr(m, "generation_config", None), GenerationConfig)]
    with _GENERATE_LOCK:
        saved = [m.generation_config for m in owners]
        for m in owners:
            m.generation_config = GenerationConfig()
        try:
            yield
        finally:
            for m, config in zip(owners, saved, strict=True):
                m.generation_config = config


def sharded_over_processes(model: nn.Module) -> bool:
    """Whether ``model`` is FSDP2-sharded across several processes: each forward is a collective then.

    ``generate`` must then run the same number of forwards on every process (transformers' ``synced_gpus``:
    a process whose completions have all ended keeps stepping until every process is done).
    """
    from lightning_rl.models import is_fully_sharded

    return is_fully_sharded(model) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class HFEngine:
    """Generate rollouts with transformers ``generate`` on the policy model (CPU or GPU).

    The engine holds no copy of the weights: it samples from the live policy, so
    ``sync_weights``, ``wake_up`` and ``sleep`` do nothing.

    Args:
        model: the policy, or a callable returning it (so a LoRA wrapper installed later is seen).
        pad_token_id: id used to pad prompts and finished completions.
        eos_token_ids: ids that end a completion.
        max_batch_size: sequences per ``generate`` call; larger rollouts are generated in chunks.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        pad_token_id: int,
        eos_token_ids: Sequence[int],
        max_batch_size: int = 64,
    ) -> None:
        if not eos_token_ids:
            raise ValueError("HFEngine needs at least one EOS token id to know where completions end")
        self._model = model
        self.pad_token_id = int(pad_token_id)
        self.eos_token_ids = [int(i) for i in eos_token_ids]
        self.max_batch_size = max_batch_size

    @property
    def model(self) -> nn.Module:
        """The model generated from."""
        return self._model if isinstance(self._model, nn.Module) else self._model()

    def sync_weights(self, model: nn.Module) -> None:
        """No-op: the engine samples from the live policy."""

    def wake_up(self) -> None:
        """No-op: nothing to restore."""

    def sleep(self) -> None:
        """No-op: nothing to release."""

    def _generation_config(self, sampling: SamplingConfig) -> GenerationConfig:
        common = dict(
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_scores=True,  # after temperature, top-k and top-p: the distribution each token was drawn from
        )
        if sampling.greedy:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or 0,
            **common,
        )

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, num_generations: int = 1
    ) -> Rollout:
        """Sample ``num_generations`` completions per prompt; see :class:`Rollout` for the layout."""
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        model = self.model
        device = next(model.parameters()).device
        rows = [p for p in prompt_ids for _ in range(num_generations)]
        ids, mask = left_pad(rows, self.pad_token_id, device)
        config = self._generation_config(sampling)
        completions, logprobs = [], []
        synced = sharded_over_processes(model)
        was_training = model.training
        model.eval()
        try:
            with sampling_only(model):
                for start in range(0, len(rows), self.max_batch_size):
                    sl = slice(start, start + self.max_batch_size)
                    out = model.generate(input_ids=ids[sl], attention_mask=mask[sl], generation_config=config,
                                         synced_gpus=synced)
                    new = out.sequences[:, ids.shape[1] :]
                    completions.append(new)
                    logprobs.append(step_logits_logprobs(list(out.scores), new, 1.0))  # scores: already scaled
                    del out
        finally:
            model.train(was_training)
        width = max(c.shape[1] for c in completions)
        completion_ids = torch.cat(
            [nn.functional.pad(c, (0, width - c.shape[1]), value=self.pad_token_id) for c in completions]
        )
        sampling_lp = torch.cat([nn.functional.pad(x, (0, width - x.shape[1])) for x in logprobs])
        completion_mask, reasons = completion_mask_and_reasons(completion_ids, self.eos_token_ids)
        group_index = torch.arange(len(prompt_ids), device=device).repeat_interleave(num_generations)
        return Rollout(
            prompt_ids=ids,
            prompt_mask=mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            sampling_logprobs=sampling_lp * completion_mask,
            finish_reasons=reasons,
            group_index=group_index,
        )


def step_logits_logprobs(step_logits: list[torch.Tensor], tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[N, T]`` log-probs of the sampled ``tokens`` from ``generate``'s per-step ``[N, V]`` logits or scores.

    ``generate``'s scores are its processed logits (temperature applied, tokens outside top-k / top-p at -inf):
    with ``temperature=1.0`` their log-softmax is the truncated, renormalized distribution the token was drawn
    from, what vLLM's processed log-probs are. One step at a time, each step's logits dropped once read: the extra
    memory is one step's ``[N, V]`` in fp32, not a second copy of all ``T`` steps (which the caller's ``generate``
    output holds once).
    """
    columns = []
    for t in range(len(step_logits)):
        z = step_logits[t].float() / temperature
        step_logits[t] = None  # type: ignore[call-overload]
        columns.append(torch.log_softmax(z, dim=-1).gather(-1, tokens[:, t, None]).squeeze(-1))
    return torch.stack(columns, dim=1)

