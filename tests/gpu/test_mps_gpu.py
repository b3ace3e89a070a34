"""The README's GPU configuration with ``VLLMRollout(mps=True)`` in a fresh process, as a user's script runs it: the
trainer and its engine process are clients of one private CUDA MPS daemon (the trainer at below-normal priority),
the fit trains, and the daemon is gone after the process."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

pytestmark = [pytest.mark.gpu, pytest.mark.vllm, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import lightning as L
    import torch
    from lightning_rl import GRPO, ArithmeticDataModule, MemoryAwarePrecision, VLLMRollout
    from lightning_rl.rewards import NumericMatch
    from lightning_rl.rollout import cuda_mps

    torch.manual_seed(0)
    module = GRPO(reward_funcs=[NumericMatch()], num_generations=8, sampling={"max_new_tokens": 64},
                  learning_rate=1e-5)
    callback = VLLMRollout(mps=True)
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            daemon = cuda_mps.active_private_mps()
            servers = daemon.server_pids() if daemon else []
            clients = [cuda_mps._pids(daemon.command(f"get_client_list {s}")) for s in servers] if daemon else []
            # each priority as its process's CUDA read it: the trainer's own environment (the callback set it at run
            # time), the engine core's from inside it (vLLM forks the core from the front end, whose environment
            # changed after it started, so /proc/PID/environ there still shows the trainer's "1")
            engine = callback.engine.engine_process()
            priorities = {os.getpid(): os.environ.get(cuda_mps.PRIORITY_ENV),
                          engine["pid"]: engine["mps_client_priority"]}
            seen.append({"using_mps": callback.using_mps, "servers": servers, "clients": clients,
                         "priorities": priorities,
                         "staleness": callback.last_timings.get("staleness"),
                         "mismatch": float(trainer.callback_metrics["train/logprob_mismatch_mean"]),
                         "reward": float(trainer.callback_metrics["train/reward_step"])})

    trainer = L.Trainer(max_steps=4, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback, Watch()], plugins=[MemoryAwarePrecision()], limit_val_batches=0)
    trainer.fit(module, datamodule=ArithmeticDataModule(num_train=64, num_val=4, batch_size=8))
    daemon = cuda_mps.active_private_mps()
    print("RESULT " + json.dumps({"pid": os.getpid(), "seen": seen, "off_reason": callback.mps_off_reason,
                                  "root": str(daemon.root) if daemon else None,
                                  "finite": all(bool(torch.isfinite(p).all()) for p in module.policy.parameters()),
                                  "steps": trainer.global_step, "overlapping": callback.overlapping}))
""")


def test_mps_true_runs_the_readme_configurations_trainer_and_engine_process_as_clients_of_one_private_mps_daemon():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=280)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    print("MPS fit:", result)
    assert result["off_reason"] is None and result["root"] is not None
    assert result["steps"] == 4 and result["overlapping"] and result["finite"]
    seen = result["seen"]
    assert all(s["using_mps"] for s in seen)
    assert all(len(s["servers"]) == 1 for s in seen)
    # the trainer and the engine core: two clients of the one server at every step
    assert all(result["pid"] in s["clients"][0] and len(s["clients"][0]) >= 2 for s in seen)
    # the trainer a below-normal client, its engine process a normal one (the engine's kernels first; a process the
    # trainer started otherwise inherits its "1"), both clients of the server
    for s in seen:
        priorities = {int(pid): value for pid, value in s["priorities"].items()}
        assert priorities.pop(result["pid"]) == "1"
        (engine_pid, engine_priority), = priorities.items()
        assert engine_pid in s["clients"][0] and engine_priority == "0", s
    assert [s["staleness"] for s in seen] == [0.0, 1.0, 1.0, 1.0]
    assert seen[0]["mismatch"] < 0.05 and all(s["mismatch"] < 0.15 for s in seen[1:])
    # the watchdog quits the daemon and removes its folder once the trainer's process has exited
    root = Path(result["root"])
    deadline = time.monotonic() + 60
    while root.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not root.exists()
