"""The per-process engine under Lightning's DDP and FSDP2, shown with one process on one GPU.

With ``strategy="ddp"`` or ``ModelParallelStrategy`` Lightning initialises ``torch.distributed`` even for one device,
so the engine takes the path every process of a multi-GPU run takes: vLLM's external launcher joining Lightning's
process group, and (FSDP2) the weights gathered from the policy's DTensor shards one tensor at a time. Lightning's
``FSDPStrategy`` (FSDP1) cannot run manual optimization and is refused at setup (tests/unit/modules/test_sharding.py).
"""

import math

import pytest
import torch

pytest.importorskip("vllm")

import lightning as L  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from lightning_rl import GRPO, ArithmeticDataModule, VLLMRollout  # noqa: E402
from lightning_rl.rewards import NumericMatch  # noqa: E402
from lightning_rl.rollout import EngineSettings  # noqa: E402
from lightning_rl.rollout.policy_weights import full_weights  # noqa: E402
from lightning_rl.rollout.sharded_weights import is_sharded  # noqa: E402

# vLLM's sleep mode allows one engine per process: bench/gpu_run.sh runs each of these in its own process
pytestmark = [pytest.mark.gpu, pytest.mark.vllm, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def length_reward(prompts, completions, **columns):
    """A reward every group varies in (its completions' lengths differ), so every step has a gradient."""
    return [float(len(c)) for c in completions]


def _grpo(learning_rate=1e-5, reward=None):
    torch.manual_seed(0)
    return GRPO(reward_funcs=[reward or NumericMatch()], model="smollm2-135m-instruct", dtype="bfloat16",
                num_generations=4,
                sampling={"max_new_tokens": 32}, micro_batch_size=16, max_prompt_length=128,
                learning_rate=learning_rate, importance_sampling="token")


def _trainer(strategy, callbacks, **kwargs):
    return L.Trainer(max_steps=2, accelerator="gpu", devices=1, strategy=strategy, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks, limit_val_batches=0, **kwargs)


class EngineSeen(L.Callback):
    """Keeps what the rollout callback's engine was started with (the engine is gone after the fit)."""

    def __init__(self, rollout: VLLMRollout) -> None:
        self.rollout = rollout
        self.kwargs: dict = {}
        self.ranks = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.kwargs = dict(self.rollout.engine.engine_kwargs)
        self.ranks = self.rollout.engine.ranks


def test_grpo_fit_under_ddp_runs_the_engine_in_external_launcher_mode():
    module = _grpo()
    rollout = VLLMRollout(settings=EngineSettings(execution="eager"))
    seen = EngineSeen(rollout)
    trainer = _trainer("ddp", [rollout, seen])
    trainer.fit(module, datamodule=ArithmeticDataModule(num_train=16, num_val=4, batch_size=4))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print("grpo ddp fit:", {k: round(v, 4) for k, v in metrics.items() if "mismatch" in k or "rollout/" in k})
    assert seen.kwargs["distributed_executor_backend"] == "external_launcher"
    assert seen.kwargs["tensor_parallel_size"] == 1
    assert seen.ranks.distributed and (seen.ranks.rank, seen.ranks.world_size) == (0, 1)
    assert trainer.global_step == 2 and rollout.num_rollouts == 2 and rollout.num_syncs == 1
    assert metrics["train/logprob_mismatch_mean"] < 0.05  # the engine generated with the policy's weights
    assert rollout.engine is None  # shut down at teardown ...
    assert torch.distributed.is_initialized()  # ... leaving Lightning's process group alone


class EngineMatchesPolicy(L.Callback):
    """After the first optimizer step and the rollout's sync: the engine's weights are the policy's, gathered."""

    NAMES = ("model.norm.weight", "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight",
             "model.layers.29.input_layernorm.weight", "model.embed_tokens.weight")

    def __init__(self, rollout: VLLMRollout) -> None:
        self.rollout = rollout
        self.start: dict[str, torch.Tensor] = {}
        self.compared: list[str] = []
        self.changed = False
        self.sharded = False

    def _policy(self, trainer, pl_module):
        return {k: v.float().cpu() for k, v in full_weights(pl_module.policy, trainer.strategy.model)}

    def on_train_start(self, trainer, pl_module):
        self.sharded = is_sharded(pl_module.policy, trainer.strategy.model)
        self.start = self._policy(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx != 1:
            return
        assert self.rollout.num_syncs == 1  # VLLMRollout's hook ran first and pushed the stepped weights
        policy = self._policy(trainer, pl_module)
        engine = {k: v.float().cpu() for k, v in self.rollout.engine.internals.model().named_parameters()}
        for name in self.NAMES:
            rows = policy[name].shape[0]  # vLLM may pad the vocabulary rows of the embedding
            assert torch.equal(engine[name][:rows], policy[name]), name
            self.compared.append(name)
        q, k, v = (policy[f"model.layers.3.self_attn.{p}_proj.weight"] for p in "qkv")
        assert torch.equal(engine["model.layers.3.self_attn.qkv_proj.weight"], torch.cat([q, k, v]))
        self.changed = any(not torch.equal(policy[n], self.start[n]) for n in self.NAMES)


def test_grpo_fit_under_fsdp2_syncs_the_gathered_shards_into_the_engine():
    # a step large enough to move bf16 weights, and a reward with a gradient at the first step: with NumericMatch the
    # first step's groups were all wrong in one run (no advantage, no step, the compared weights unchanged)
    module = _grpo(learning_rate=1e-3, reward=length_reward)
    rollout = VLLMRollout(settings=EngineSettings(execution="eager"))
    check = EngineMatchesPolicy(rollout)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)  # FSDP2: the module shards itself
    trainer = _trainer(strategy, [rollout, check], precision="bf16-true")  # the policy's own bf16 in FSDP2 units
    trainer.fit(module, datamodule=ArithmeticDataModule(num_train=16, num_val=4, batch_size=4))
    print("grpo fsdp2 fit: compared", check.compared, "changed by the step:", check.changed)
    assert check.sharded  # the policy's parameters are DTensors: the sync went through the gather
    assert check.compared == list(EngineMatchesPolicy.NAMES)
    assert check.changed  # the compared weights are the stepped ones, not the initial ones
    assert trainer.global_step == 2 and rollout.num_syncs == 1


@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["no-reference", "sharded-reference"])
def test_grpo_fit_under_fsdp2_with_the_memory_plugin(beta):
    """``ModelParallelStrategy`` + ``MemoryAwarePrecision``: fp32 master shards, a per-process plan, the engine fed;
    with ``beta > 0`` the frozen reference copy is sharded too, in bf16, and the plan counts its gathered set."""
    from torch.distributed.tensor import DTensor

    from lightning_rl import MemoryAwarePrecision
    from lightning_rl.plugins.memory_plan import fsdp2_gathered_bytes_with_reference

    torch.manual_seed(0)
    module = GRPO(reward_funcs=[NumericMatch()], model="smollm2-135m-instruct", num_generations=4,
                  sampling={"max_new_tokens": 32}, max_prompt_length=128, learning_rate=1e-5,
                  importance_sampling="token", beta=beta)
    rollout = VLLMRollout(settings=EngineSettings(execution="eager"))
    plugin = MemoryAwarePrecision()
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    trainer = _trainer(strategy, [rollout], plugins=[plugin])
    trainer.fit(module, datamodule=ArithmeticDataModule(num_train=16, num_val=4, batch_size=4))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    plan = plugin.memory_plan
    print("grpo fsdp2 + plugin:", {"train_parts": plan.train_parts if plan else None,
                                   **{k: round(v, 4) for k, v in metrics.items() if "mismatch" in k}})
    params = list(module.policy.parameters())
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in params)  # trainable fp32 masters
    assert not rollout.overlapping  # one engine per process in the trainer's process group
    assert plan is not None and plan.train_parts["FSDP2 gathered weights (root unit and two layers)"] > 0
    assert trainer.global_step == 2 and rollout.num_syncs == 1
    assert metrics["train/logprob_mismatch_mean"] < 0.05
    assert all(torch.isfinite(p.full_tensor()).all() for p in params)
    references = list(module._frozen_reference)
    assert plan.train_parts["FSDP2 gathered weights (root unit and two layers)"] == \
        fsdp2_gathered_bytes_with_reference([module.policy], references)
    if beta:
        ref = references[0]
        assert all(isinstance(p, DTensor) and p.dtype == torch.bfloat16 for p in ref.parameters())
        assert isinstance(ref.lm_head.weight, DTensor)  # its root was given back after its forward
        kl = [float(v) for k, v in metrics.items() if k.startswith("train/kl")]
        assert kl and all(math.isfinite(v) and v >= 0 for v in kl)
    else:
        assert not references
