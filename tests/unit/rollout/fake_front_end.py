"""A stand-in for vLLM's ``LLM``, made in the front-end process by tests/unit/rollout/test_front_end_process.py.

Its outputs have the shape of ``vllm.LLM.generate``'s with flat log-probs (the sampled token first at each
position, then another candidate). Kept light: the spawned front-end process imports it.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from types import SimpleNamespace


def completion(prompt_last: int, index: int, length: int) -> SimpleNamespace:
    """Completion ``index`` of a prompt ending in ``prompt_last``: tokens and flat log-probs as vLLM gives them."""
    tokens = [prompt_last + index + k for k in range(length)]
    starts, flat_ids, flat_lp = [], [], []
    for k, t in enumerate(tokens):
        starts.append(len(flat_ids))
        flat_ids += [t, t + 1000]
        flat_lp += [-0.1 * (k + 1) - index, -9.0]
    return SimpleNamespace(index=index, token_ids=tokens, finish_reason="stop" if index == 0 else "length",
                           logprobs=SimpleNamespace(start_indices=starts, token_ids=flat_ids, logprobs=flat_lp))


class FakeEngine:
    """vLLM's ``llm_engine``: ``generate`` calls ``step`` once for the prefill and once per token."""

    def step(self):
        return []


class FakeLLM:
    def __init__(self):
        self.llm_engine = FakeEngine()

    def generate(self, prompts, params, use_tqdm=False, lora_request=None):
        for _ in range(params["max_tokens"] + 1):
            self.llm_engine.step()
        return [SimpleNamespace(outputs=[completion(p["prompt_token_ids"][-1], i, params["max_tokens"])
                                         for i in reversed(range(params["n"]))])  # any order, as vLLM's
                for p in prompts]

    def collective_rpc(self, method, args=()):
        if method == "fail":
            raise RuntimeError(f"the worker failed on {args}")
        if method == "gc_freeze_count":
            return gc.get_freeze_count()
        return [(method, tuple(args), os.getpid())]

    def reset_prefix_cache(self):
        return True


class FakeInternals:
    def __init__(self, kwargs):
        self.llm = FakeLLM()
        self.marker = kwargs.get("marker")

    def shutdown(self):
        if self.marker:
            Path(self.marker).write_text(f"shut down {os.getpid()}")


def start(kwargs):
    if kwargs.get("fail_start"):
        raise ValueError(f"no such model: {kwargs['fail_start']}")
    return FakeInternals(kwargs)
