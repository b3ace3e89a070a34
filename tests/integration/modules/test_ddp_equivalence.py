"""GRPO and PPO under Lightning's DDP and FSDP2 (2 CPU processes, gloo) match one process holding the same global
batch."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RUN = Path(__file__).with_name("ddp_runs.py")
TESTS = Path(__file__).parents[2]  # tests/: the runs import helpers from there, every rank alike
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}


# a run's results by its arguments: the one-process reference runs recur across tests (each run starts one or two
# Python processes, most of its time); runs that write into a test's folder name it in their flags, so never recur
_RUNS: dict[tuple, dict] = {}


def _fit(tmp_path, method, devices, batch_size, strategy="ddp", *flags):
    key = (method, devices, batch_size, strategy, *flags)
    if key not in _RUNS:
        out = tmp_path / f"{method}_{devices}_{strategy}_{batch_size}{''.join(Path(f).name for f in flags)}.pt"
        proc = subprocess.run([sys.executable, str(RUN), "--method", method, "--devices", str(devices),
                               "--batch-size", str(batch_size), "--strategy", strategy, "--out", str(out), *flags],
                              capture_output=True, text=True, timeout=300, env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _RUNS[key] = torch.load(out)
    return _RUNS[key]


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, method):
    one = _fit(tmp_path, method, devices=1, batch_size=4)
    two = _fit(tmp_path, method, devices=2, batch_size=2)  # 2 x 2 prompts: the same 4 prompts per step
    assert len(one["reward"]) == len(two["reward"]) == 3
    # the logged reward and loss are those of the whole step, whichever process logs them
    torch.testing.assert_close(torch.tensor(two["reward"]), torch.tensor(one["reward"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(two["loss"]), torch.tensor(one["loss"]), rtol=1e-4, atol=1e-6)
    # PPO's adaptive KL coefficient moves by the sequences of both processes, as with one
    torch.testing.assert_close(torch.tensor(two["kl_coef"]), torch.tensor(one["kl_coef"]), rtol=1e-5, atol=1e-9)
    assert method == "grpo" or len(set(one["kl_coef"])) == 3  # it moved at every step
    # the same updates, up to the order of floating-point sums
    for name, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], w, rtol=0, atol=2e-4, msg=name)
    moved = max((one["weights"][k] - w).abs().max().item()
                for k, w in _fit(tmp_path, method, devices=1, batch_size=2)["weights"].items())
    assert moved > 1e-2  # half the batch in one process trains differently: the comparison can tell


def test_a_token_budget_gives_every_process_as_many_micro_batches(tmp_path):
    """Micro-batches sized from a token budget and each process's padded length: the longest of all processes
    decides, else one process makes a backward (a DDP collective) more than the other and both wait forever."""
    one = _fit(tmp_path, "grpo", 1, 4, "ddp", "--micro-batch-tokens", "40")
    two = _fit(tmp_path, "grpo", 2, 2, "ddp", "--micro-batch-tokens", "40")
    torch.testing.assert_close(torch.tensor(two["reward"]), torch.tensor(one["reward"]), rtol=1e-5, atol=1e-6)
    for name, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], w, rtol=0, atol=2e-4, msg=name)


def test_processes_that_sized_their_micro_batches_apart_all_take_the_smallest(tmp_path):
    """Each process sizes its micro-batches from its own device (free memory, its memory plan): process 0's budget
    of 400 tokens holds its whole share in one micro-batch, process 1's 40 tokens take four. Each backward of a DDP
    module is a collective, so before, process 1's second backward waited for one process 0 never made. Now every
    process takes the smallest budget when training starts, and the run trains as one process with it."""
    one = _fit(tmp_path, "grpo", 1, 4, "ddp", "--micro-batch-tokens", "40")
    two = _fit(tmp_path, "grpo", 2, 2, "ddp", "--micro-batch-tokens", "40", "--first-process-micro-batch-tokens", "400")
    assert two["micro_batch_tokens"] == 40
    torch.testing.assert_close(torch.tensor(two["reward"]), torch.tensor(one["reward"]), rtol=1e-5, atol=1e-6)
    for name, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], w, rtol=0, atol=2e-4, msg=name)


def test_both_processes_of_a_ddp_run_export_into_one_folder(tmp_path):
    """Under DDP every process writes the (whole) policy: the one that comes second finds the first one's files,
    without the README that marks a finished export yet, and must not take them for a user's (it did)."""
    from transformers import AutoModelForCausalLM

    exported = tmp_path / "ddp_exported"
    two = _fit(tmp_path, "grpo", 2, 2, "ddp", "--export", str(exported))
    model = AutoModelForCausalLM.from_pretrained(exported)
    for name, w in two["weights"].items():
        torch.testing.assert_close(model.state_dict()[name].float(), w, rtol=0, atol=0, msg=name)


def test_a_sharded_export_refused_on_one_process_is_refused_on_all_before_the_gather(tmp_path):
    """Under FSDP2 the export gathers the shards (a collective). Process 1's folder holds a user's file (a node's own
    disk); process 0's is empty. Both refuse, before the gather: one raising alone would leave the other waiting."""
    exported = tmp_path / "fsdp2_exported"
    two = _fit(tmp_path, "grpo", 2, 2, "fsdp2", "--export", str(exported), "--foreign-export-folder-on-rank1")
    assert two["sharded"] and "another process found files that no export wrote" in two["export_error"]
    assert not exported.exists() or not any(exported.iterdir())  # nothing written


def test_a_process_with_no_scored_completion_neither_stops_alone_nor_stalls_the_kl_coefficient(tmp_path):
    """PPO over 2 processes, process 1's completions all unscored: the run goes on (process 0 scored its own, so the
    step is not unscored), and the KL is the mean over process 0's scored completions, so the adaptive coefficient
    moves at every step. Before, process 1 raised RewardError alone and the others waited in the next collective;
    and its NaN KL made the run's KL NaN, which the controller skips."""
    two = _fit(tmp_path, "ppo", 2, 2, "ddp", "--rank1-unscored")
    assert len(two["kl"]) == 3 and all(math.isfinite(k) and k >= 0 for k in two["kl"])
    assert len(set(two["kl_coef"])) == 3 and 0.05 not in two["kl_coef"]  # it moved at every step


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_two_processes_sharded_with_fsdp2_train_like_one(tmp_path, method):
    """ModelParallelStrategy over 2 processes: each holds half of every weight (PPO's frozen KL reference too), and
    the update is the same; both processes export, the first writes the gathered weights."""
    one = _fit(tmp_path, method, devices=1, batch_size=4)
    exported = tmp_path / f"{method}_exported"
    two = _fit(tmp_path, method, 2, 2, "fsdp2", "--export", str(exported))
    assert two["sharded"] and not one["sharded"]
    assert two["reference_sharded"] == ([True] if method == "ppo" else [])
    assert two["synced_generate"]  # generate stepped in lockstep: every forward of a sharded policy is collective
    torch.testing.assert_close(torch.tensor(two["reward"]), torch.tensor(one["reward"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(two["loss"]), torch.tensor(one["loss"]), rtol=1e-4, atol=1e-6)
    for name, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], w, rtol=0, atol=2e-4, msg=name)
    from lightning_rl.models import load_policy
    from lightning_rl.rollout.policy_weights import full_weights

    written = dict(full_weights(load_policy(str(exported))[0]))
    assert written.keys() == two["weights"].keys()
    for name, w in two["weights"].items():
        assert torch.equal(written[name].float(), w), name


def test_lora_under_fsdp2_with_the_memory_plugin_plans_each_process_shard(tmp_path):
    """LoRA + MemoryAwarePrecision over 2 FSDP2 processes: frozen bf16 and trainable fp32 shards, a plan per process."""
    # two steps: the adapters' updates differ by the order of the sharded sums, and Adam scales a near-zero gradient's
    # difference up to a fraction of the learning rate, so a third step's sampling can draw one other token (it did
    # on an AMD EPYC host: 0.0024 of reward at step 3, the first two steps equal)
    one = _fit(tmp_path, "grpo", 1, 4, "ddp", "--plugin", "--lora", "--steps", "2")
    two = _fit(tmp_path, "grpo", 2, 2, "fsdp2", "--plugin", "--lora", "--steps", "2")
    assert two["sharded"] and two["dtypes"] == one["dtypes"] == ["torch.bfloat16", "torch.float32"]
    torch.testing.assert_close(torch.tensor(two["reward"]), torch.tensor(one["reward"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(two["loss"]), torch.tensor(one["loss"]), rtol=1e-4, atol=1e-6)
    adapters = [k for k in one["weights"] if "lora_" in k]
    assert adapters
    for name in adapters:  # a tenth of one step's move (learning rate 1e-2); a shard left out would move it all
        torch.testing.assert_close(two["weights"][name], one["weights"][name], rtol=0, atol=1e-3, msg=name)
    whole, shard = one["plan"]["train_parts"], two["plan"]["train_parts"]
    for part in ("frozen weights", "trainable weights", "gradients", "optimizer states"):
        assert 0.45 * whole[part] <= shard[part] <= 0.55 * whole[part], (part, whole[part], shard[part])
    gathered = "FSDP2 gathered weights (root unit and two layers)"
    weights = whole["frozen weights"] + whole["trainable weights"]
    # the root unit and two layers, gathered: at most the whole model and one more layer (this model has one)
    assert gathered not in whole and weights // 2 < shard[gathered] <= 2 * weights


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_with_their_own_random_states_resume_as_the_uninterrupted_run(tmp_path, strategy):
    """Each process seeded apart (seed + rank, as RL runs do for varied samples) and sampling from its own random
    state: a run stopped after step 2 and resumed from last.ckpt, seeded otherwise, samples and trains as the run
    that went on. The checkpoint holds each process's random state; before, every process resumed with the first
    process's, so process 1 drew other completions than it would have."""
    full = _fit(tmp_path, "grpo", 2, 2, strategy, "--seed-per-process", "0", "--steps", "4")
    ckpt = tmp_path / "ckpt"
    first = _fit(tmp_path, "grpo", 2, 2, strategy, "--seed-per-process", "0", "--steps", "2", "--ckpt-dir", str(ckpt))
    assert first["reward"] == full["reward"][:2]
    resumed = _fit(tmp_path, "grpo", 2, 2, strategy, "--seed-per-process", "100", "--steps", "4",
                   "--ckpt-dir", str(ckpt), "--resume")
    assert resumed["reward"] == full["reward"][2:] and resumed["loss"] == full["loss"][2:]
    for name, w in full["weights"].items():
        assert torch.equal(resumed["weights"][name], w), name
    # the comparison can tell: seeded alike, the two processes sample other completions
    alike = _fit(tmp_path, "grpo", 2, 2, strategy, "--steps", "4", "--seed-per-process", "0", "--same-seed")
    assert alike["reward"] != full["reward"] or any(
        not torch.equal(alike["weights"][k], w) for k, w in full["weights"].items())
