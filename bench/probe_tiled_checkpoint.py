"""Diagnostic: sliced MLPs inside compiled, checkpointed decoder layers on a GPU, with and without offloading.

On an H200 a Qwen2.5-0.5B-shaped GRPO fit with ``tile_mlps`` and compiled, packed layers stopped in its first
backward: ``torch.utils.checkpoint`` found the recomputed layer's saved tensors in another order than the forward's
(bench/results/vs_trl_NOTES.md, twenty-fourth visit). A CPU did not reproduce it. This probe runs one update of a
Qwen2.5-0.5B-shaped model with fewer layers (fp32 master weights under bf16 autocast, packed sequences, the Triton
log-prob kernel) for each variant, each in its own process, with checkpoint debug mode on. It writes whether the
backward ran and, when it did not, the error with the debug mode's account of the ops that saved each tensor.

    python bench/probe_tiled_checkpoint.py --out OUT.json [--variants compiled,compiled-tiled,...]

Variants: ``compiled`` / ``eager``, ``-tiled`` (``tile_decoder_mlps``), ``-offload`` (offloaded checkpoints).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

QWEN05_SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=4,
                    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                    tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)
VARIANTS = ("compiled", "compiled-tiled", "compiled-offload", "compiled-tiled-offload", "eager-tiled",
            "eager-tiled-offload")


def one_variant(variant: str, sequences: int, prompt_len: int, new_tokens: int, device: str = "cuda") -> dict:
    """One packed update of ``variant``; whether its backward ran, its peak, and the error if not.

    ``device="cpu"`` is a smoke run (the reference log-prob path, no peak, no offloading: it needs pinned memory).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lightning_rl.compiled_layers import compile_decoder_layers
    from lightning_rl.logprobs import packed_completion_logprobs
    from lightning_rl.models import enable_activation_checkpointing
    from lightning_rl.tiled_mlp import tile_decoder_mlps

    torch.manual_seed(0)
    net = Qwen2ForCausalLM(Qwen2Config(**QWEN05_SHAPE)).to(device).train()
    enable_activation_checkpointing(net, offload="offload" in variant)
    if variant.startswith("compiled"):
        compile_decoder_layers(net)
    if "tiled" in variant:
        tile_decoder_mlps(net)
    g = torch.Generator(device=device).manual_seed(0)
    p_ids = torch.randint(0, 151936, (sequences, prompt_len), device=device, generator=g)
    c_ids = torch.randint(0, 151936, (sequences, new_tokens), device=device, generator=g)
    lengths = torch.randint(1, new_tokens + 1, (sequences,), device=device, generator=g)
    c_mask = (torch.arange(new_tokens, device=device)[None] < lengths[:, None]).long()
    cuda = device == "cuda"
    result: dict = {"variant": variant, "tokens": int(p_ids.numel() + c_mask.sum())}
    try:
        for step in range(2):
            net.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with torch.utils.checkpoint.set_checkpoint_debug_enabled(True), \
                    torch.autocast(device, dtype=torch.bfloat16):
                logp, _ = packed_completion_logprobs(net, p_ids, torch.ones_like(p_ids), c_ids, c_mask,
                                                     backend="triton" if cuda else "reference",
                                                     max_len=prompt_len + new_tokens)
                (-(logp * c_mask).sum() / c_mask.sum()).backward()
            if cuda:
                torch.cuda.synchronize()
                result[f"peak_gib_step{step}"] = torch.cuda.max_memory_allocated() / 2**30
        result["ok"] = True
    except Exception as err:  # the probe records every failure
        result.update(ok=False, error=f"{type(err).__name__}: {err}"[:20000])
    return result


def main() -> None:
    """Run each variant in a child process and write the results."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_variant(args.one, args.sequences, args.prompt_len, args.new_tokens, args.device)))
        return
    results = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--out", args.out, "--one", variant, "--sequences", str(args.sequences),
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        results.append(json.loads(lines[-1]) if lines else
                       {"variant": variant, "ok": False, "error": proc.stderr[-4000:]})
        print(variant, "ok" if results[-1]["ok"] else results[-1]["error"][:300], flush=True)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    info = {"device": name, "torch": torch.__version__,
            "config": {**QWEN05_SHAPE, "sequences": args.sequences, "prompt_len": args.prompt_len,
                       "new_tokens": args.new_tokens}}
    with open(args.out, "w") as f:
        json.dump({"probe": "tiled_checkpoint", **info, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
