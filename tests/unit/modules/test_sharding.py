"""Sharded training: FSDPStrategy refused with the fix named, FSDP2 sharding under ModelParallelStrategy's mesh."""

import pytest
import torch
from helpers import make_trainer
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from lightning_rl.models import load_policy
from lightning_rl.modules.sharding import check_strategy, data_parallel_mesh, fully_shard_policy, is_fully_sharded
from lightning_rl.rollout.policy_weights import full_weights


def test_fsdp1_is_refused_with_the_fix_and_ddp_is_accepted():
    with pytest.raises(ValueError, match=r"(?s)manual.*#19685.*ModelParallelStrategy\(data_parallel_size"):
        check_strategy(FSDPStrategy())
    check_strategy(DDPStrategy())


def test_a_module_under_fsdp_strategy_stops_at_setup(make_grpo):
    module = make_grpo()
    module.trainer = make_trainer()
    module.trainer.strategy._lightning_module = module
    module.trainer._accelerator_connector.strategy = FSDPStrategy()
    with pytest.raises(ValueError, match="FSDPStrategy"):
        module.setup("fit")


class FakeMesh:
    def __init__(self, sizes):
        self.sizes = sizes
        self.mesh_dim_names = tuple(sizes)

    def __getitem__(self, name):
        return type("Sub", (), {"size": lambda _self, n=self.sizes[name]: n, "name": name})()

    def size(self):
        return 1


def test_tensor_parallel_training_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"tensor_parallel size 2.*tensor_parallel_size=1"):
        data_parallel_mesh(FakeMesh({"data_parallel": 1, "tensor_parallel": 2}))
    assert data_parallel_mesh(FakeMesh({"data_parallel": 2, "tensor_parallel": 1})).name == "data_parallel"


@pytest.fixture
def cpu_mesh(one_process_group):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))


def test_fully_sharded_policy_trains_like_the_plain_one(cpu_mesh, saved_tiny_llama):
    path = saved_tiny_llama(2)
    plain, sharded = load_policy(path)[0].train(), load_policy(path)[0].train()
    fully_shard_policy(sharded, cpu_mesh)
    assert is_fully_sharded(sharded) and fully_shard_policy(sharded, cpu_mesh) is sharded  # idempotent
    assert all(type(p).__name__ == "DTensor" for p in sharded.parameters())
    ids = torch.randint(0, plain.config.vocab_size, (2, 7))
    losses = []
    for m in (plain, sharded):
        loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0])
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for n, p in sharded.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), grads[n], rtol=1e-5, atol=1e-7)
    want = dict(full_weights(plain))
    got = {n: t.clone() for n, t in full_weights(sharded)}
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_modules_shard_every_trained_module_under_a_mesh(cpu_mesh, make_grpo):
    from lightning_rl import PPO

    grpo = make_grpo()
    grpo.configure_model()  # loaded before the fit (as evaluate() does): no mesh yet
    assert not is_fully_sharded(grpo.policy)
    grpo.trainer = make_trainer()
    grpo._device_mesh = cpu_mesh
    grpo.configure_model()
    assert is_fully_sharded(grpo.policy)

    ppo = PPO(reward_funcs=[lambda prompts, completions, **k: [0.0] * len(completions)], model="tiny-llama",
              model_config={"num_hidden_layers": 1}, critic_model="tiny-llama",
              critic_model_config={"num_hidden_layers": 1})
    ppo.trainer = make_trainer()
    ppo._device_mesh = cpu_mesh
    ppo.configure_model()
    assert is_fully_sharded(ppo.policy) and is_fully_sharded(ppo.critic) and is_fully_sharded(ppo.value_head)
