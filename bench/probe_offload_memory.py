"""Diagnostic: the trainer's device memory outside PyTorch after each phase of a checkpointed update.

Every bench run since the library's own reentrant checkpoint offload (2026-12-04i onwards) held 0.795 GiB outside
PyTorch after its first optimizer step, every run before it 0.727, whatever the case (bench/results/vs_trl_NOTES.md,
thirty-first visit): the first backward adds 64 MiB there. This probe runs a SmolLM2-shaped policy (random
weights, saved and loaded as users load it: fp32 masters under bf16 autocast) through two updates of 12k tokens
with the decoder layers compiled or eager, their checkpoints offloaded or plain, and writes the process's NVML
figure less PyTorch's reserve, and the CUDA stack limit, after the context, the first forward (one packed row, as
the update runs, unless ``--padded``), the first backward and the second update.

    python bench/probe_offload_memory.py --out OUT.json --layers compiled --checkpoints offloaded
    python bench/probe_offload_memory.py --out OUT.json --layers compiled --checkpoints offloaded \
        --inductor '{"use_static_cuda_launcher": false}'

Run each variant in a fresh process (``bash bench/gpu_visit.sh offload-memory`` runs the four): modules a variant
loads stay loaded, so a second variant in the same process would see none of its own growth.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from probe_context_memory import stage_marker  # bench/, beside this script

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", choices=["compiled", "eager"], default="compiled")
    parser.add_argument("--checkpoints", choices=["offloaded", "plain"], default="offloaded")
    parser.add_argument("--inductor", default="{}", help="JSON of torch._inductor.config values to set first")
    parser.add_argument("--padded", action="store_true", help="padded rows instead of one packed row (the default)")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--length", type=int, default=192, help="tokens per sequence (64 x 192: 12k, as a packed step)")
    args = parser.parse_args()
    import torch._inductor.config as inductor_config

    for key, value in json.loads(args.inductor).items():
        setattr(inductor_config, key, value)
    from lightning_rl.compiled_layers import compile_decoder_layers
    from lightning_rl.logprobs import completion_logprobs, packed_completion_logprobs
    from lightning_rl.models import enable_activation_checkpointing, load_policy

    stages: list[dict] = []
    mark = stage_marker(stages)

    torch.zeros(1, device="cuda")
    mark("context")
    with tempfile.TemporaryDirectory() as folder:
        net, tok = load_policy("tiny-llama", SMOLLM2_SHAPE)
        net.save_pretrained(folder)
        tok.save_pretrained(folder)
        model, _ = load_policy(folder)
    model = model.cuda().train()
    enable_activation_checkpointing(model, offload=args.checkpoints == "offloaded")
    if args.layers == "compiled":
        compile_decoder_layers(model)
    mark("policy loaded")
    n, length = args.sequences, args.length
    prompt = length // 4
    ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (n, length), device="cuda")
    p_ids, c_ids = ids[:, :prompt], ids[:, prompt:]
    p_mask, c_mask = torch.ones_like(p_ids), torch.ones_like(c_ids)
    timings = []
    for step in range(2):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logprobs = completion_logprobs if args.padded else packed_completion_logprobs
            logp, ent = logprobs(model, p_ids, p_mask, c_ids, c_mask, backend="auto")
        if step == 0:
            mark("first forward")
        (-(logp.mean()) - 0.01 * ent.mean()).backward()
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - t0)
        mark("first backward" if step == 0 else "second update")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
              "tokens": n * length, "update_s": timings, "stages": stages,
              "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
