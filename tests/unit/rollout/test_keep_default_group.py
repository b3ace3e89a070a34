"""The engine's teardown cannot destroy a process group that existed before it (Lightning's)."""

import torch.distributed as dist

from lightning_rl.rollout.vllm_internals import VLLMInternals, keep_default_group


class FakeLLM:
    """Stands in for vllm.LLM: its engine core's shutdown destroys the default group, as seen on a GPU."""

    def __init__(self):
        self.llm_engine = self
        self.engine_core = self
        self.calls = 0

    def shutdown(self):
        self.calls += 1
        dist.destroy_process_group()


def test_shutdown_leaves_the_trainers_default_group_and_destroys_the_others(one_process_group):
    llm = FakeLLM()
    VLLMInternals(llm, dist_was_initialized=True).shutdown()
    assert llm.calls == 1 and dist.is_initialized()
    real = dist.destroy_process_group
    with keep_default_group():
        group = dist.new_group([0])
        dist.destroy_process_group(group)  # another group is still destroyed
        dist.destroy_process_group()  # the default one is kept
        assert dist.is_initialized()
    assert dist.destroy_process_group is real
    dist.destroy_process_group()  # the real one again
    assert not dist.is_initialized()
