"""GRPO in an ordinary Lightning script: your own reward, your own prompts, `Trainer.fit`.

    python examples/grpo_python_api.py            # SmolLM2-135M-Instruct (embedded default)
    python examples/grpo_python_api.py tiny-llama # a tiny random model, seconds on a CPU
"""

import sys

import lightning as L

from lightning_rl import GRPO, PromptDataModule, SamplingConfig
from lightning_rl.rewards import LengthPenalty


def mentions_lightning(prompts, completions, **columns):
    """1.0 when the completion names the keyword of its row, else 0.0."""
    return [float(kw.lower() in c.lower()) for c, kw in zip(completions, columns["keyword"])]


def main(model: str = "smollm2-135m-instruct") -> None:
    L.seed_everything(0)
    rows = [{"prompt": f"Write one short sentence about {topic}.", "keyword": "lightning"}
            for topic in ("storms", "speed", "weather", "light", "thunder", "summer", "clouds", "electricity")]
    data = PromptDataModule(train_data=rows, batch_size=4)
    module = GRPO(
        reward_funcs=[mentions_lightning, LengthPenalty(target=24, coef=0.02)],
        reward_weights=[1.0, 1.0],
        model=model,
        lora={"r": 8},
        num_generations=4,
        sampling=SamplingConfig(max_new_tokens=24),
        learning_rate=2e-4,
    )
    trainer = L.Trainer(max_steps=4, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    print({k: round(float(v), 3) for k, v in trainer.callback_metrics.items() if k.startswith("train/reward")})


if __name__ == "__main__":
    main(*sys.argv[1:])
