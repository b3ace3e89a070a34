"""The policy's full weights out of FSDP shards, one unit or tensor at a time, under the policy's own names."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_rl.models import load_policy
from lightning_rl.rollout.policy_weights import full_weights, policy_parameters
from lightning_rl.rollout.sharded_weights import clean_name, gathered_parameters, is_sharded

RUN = Path(__file__).with_name("sharded_runs.py")


def test_wrapper_parts_are_dropped_from_names():
    assert clean_name("model.layers.0._fsdp_wrapped_module.self_attn.q_proj.weight") == (
        "model.layers.0.self_attn.q_proj.weight")
    assert clean_name("_fsdp_wrapped_module.policy.model.layers.1._fsdp_wrapped_module._checkpoint_wrapped_module."
                      "mlp.up_proj.weight") == "policy.model.layers.1.mlp.up_proj.weight"
    assert clean_name("_orig_mod.lm_head.weight") == "lm_head.weight"
    # only whole wrapper parts go
    assert clean_name("model.my_fsdp_wrapped_module.weight") == "model.my_fsdp_wrapped_module.weight"


def test_an_unsharded_policy_gives_its_parameters_as_they_are():
    model, _ = load_policy("tiny-llama")
    assert not is_sharded(model)
    want = dict(model.named_parameters())
    got = list(policy_parameters(model))
    assert [n for n, _ in got] == list(want)
    assert all(t.data_ptr() == want[n].data_ptr() for n, t in got)  # no copies
    assert [n for n, _ in gathered_parameters(model)] == list(want)
    assert [n for n, _ in full_weights(model)] == list(want)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = ["fsdp1", "fsdp1-orig", "fsdp2", "fsdp2+lora", "fsdp1-orig+lora", "prompts"]


def test_two_processes_gather_what_one_holds():
    """FSDP1 (flat parameters, with and without use_orig_params; one unit at a time, the reference model's never)
    and FSDP2 (DTensors), plain and LoRA (base weights and adapter tensors), and a tensor-parallel group's prompts,
    over 2 gloo processes (one run for all the cases: the processes start once)."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[3]),
                                                                     os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(RUN), str(_free_port()), *CASES], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
