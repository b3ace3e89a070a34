"""Diagnostic: the host time of one checkpointed forward + backward, by how much of the decoder one compile covers.

The update of a small model is bound by the host: per micro-batch it calls each compiled decoder layer for the
forward, again for the recomputed forward, and once for the backward, and each call pays for Dynamo's guards,
AOTAutograd's wrappers and the launches (``vs_trl_NOTES.md``, thirteenth visit). This times a model small
enough that compute is negligible, so the figure is mostly that host work:

- ``eager``: no compile;
- ``layers``: each decoder layer compiled (``lightning_rl.compiled_layers``, what the library does);
- ``stack``: the whole decoder (embeddings, layers, norm) as one compiled region, the checkpoints inside it.

    python bench/probe_compile_regions.py --out OUT.json [--layers 30] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def build(layers: int, device: str) -> torch.nn.Module:
    """A Llama-shaped model too small for its compute to matter, checkpointed as the library trains it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_rl.models import enable_activation_checkpointing

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
    model = LlamaForCausalLM(config).to(device).train()
    enable_activation_checkpointing(model)
    return model


def step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """One forward and backward of the decoder (the loss on its last hidden states)."""
    hidden = model.model(input_ids=ids).last_hidden_state
    hidden.float().square().mean().backward()


def time_variant(name: str, layers: int, device: str, ids: torch.Tensor, iters: int) -> dict:
    """Compile (if asked), warm up, then time ``iters`` steps; milliseconds per step and the compile's seconds."""
    from lightning_rl.compiled_layers import compile_decoder_layers

    model = build(layers, device)
    if name == "layers":
        compile_decoder_layers(model)
    elif name == "stack":
        model.model = torch.compile(model.model, dynamic=True)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(3):  # compile and warm up
        step(model, ids)
        model.zero_grad(set_to_none=True)
    sync()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step(model, ids)
        sync()
        times.append((time.perf_counter() - t) * 1e3)
        model.zero_grad(set_to_none=True)
    return {"variant": name, "ms_per_step_median": statistics.median(times), "ms_per_step_min": min(times),
            "warmup_s": warm_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default="eager,layers,stack")
    args = ap.parse_args()
    ids = torch.randint(0, 256, (args.batch, args.tokens), device=args.device)
    import transformers

    report = {"probe": "host time of a checkpointed forward + backward by compile region", "config": vars(args),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}, "runs": []}
    for name in args.variants.split(","):
        try:
            report["runs"].append(time_variant(name, args.layers, args.device, ids, args.iters))
        except Exception as err:  # noqa: BLE001 - a diagnostic: record the failure, go on
            report["runs"].append({"variant": name, "error": f"{type(err).__name__}: {err}"[:500]})
        print(report["runs"][-1], flush=True)
        with open(args.out, "w") as f:  # after each variant: a variant cut off by a time limit keeps the others
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
