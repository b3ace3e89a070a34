"""DPO with precomputed reference log-probs under DDP (2 CPU processes, gloo), fed by a plain DataLoader.

Run by tests/integration/modules/test_precomputed_reference_ranks.py as a script, with ``tests/`` on ``PYTHONPATH``
(Lightning's DDP launcher starts the other rank by running this file again). Each process precomputes the rows its
DistributedSampler gives it in the first epoch; the second epoch reshuffles them. Rank 0 writes what its cache
holds.

    PYTHONPATH=tests python tests/integration/modules/precomputed_reference_ranks.py --model DIR --out r.pt
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from test_preference_learns import sorted_pairs

from lightning_rl import DPO
from lightning_rl.data.rows import rows_loader


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    rows = [{**row, "index": i} for i, row in enumerate(sorted_pairs(16, 1))]
    module = DPO(model=args.model, beta=0.1, learning_rate=1e-2, reference="precomputed")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=rows_loader(rows, batch_size=2, shuffle=True))
    if trainer.is_global_zero:
        torch.save({"steps": trainer.global_step, "cached": sorted(module._ref_cache.get("train", {}))}, args.out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
