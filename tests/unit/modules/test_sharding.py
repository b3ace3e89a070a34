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


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_update_log_probs_of_a_sharded_policy_match_the_plain_one(cpu_mesh, saved_tiny_llama, layout):
    """The update's path (backbone, then the LM head's weight) gathers the sharded root parameters, in the padded
    layout and packed in one row (the default on a GPU, whose backbone-only forward met sharded weights)."""
    from lightning_rl.logprobs import completion_logprobs, packed_completion_logprobs

    logprobs = completion_logprobs if layout == "padded" else packed_completion_logprobs
    path = saved_tiny_llama(2)
    plain, sharded = load_policy(path)[0].train(), load_policy(path)[0].train()
    fully_shard_policy(sharded, cpu_mesh)
    g = torch.Generator().manual_seed(0)
    vocab = plain.config.vocab_size
    p_ids, c_ids = torch.randint(0, vocab, (3, 5), generator=g), torch.randint(0, vocab, (3, 6), generator=g)
    p_mask, c_mask = torch.ones_like(p_ids), torch.ones_like(c_ids)
    p_mask[0, :2], c_mask[1, 4:] = 0, 0
    results = []
    for m in (plain, sharded):
        with torch.no_grad():  # old log-probs first, as a second pass over the rollout does
            logprobs(m, p_ids, p_mask, c_ids, c_mask, backend="reference")
        logp, ent = logprobs(m, p_ids, p_mask, c_ids, c_mask, backend="reference")
        (logp.sum() + ent.sum()).backward()
        results.append(logp.detach())
    torch.testing.assert_close(results[1], results[0])
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for n, p in sharded.named_parameters():
        assert type(p).__name__ == "DTensor", f"{n} stayed gathered after the backward"
        torch.testing.assert_close(p.grad.full_tensor(), grads[n], rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_grpo_fit_under_model_parallel_strategy_matches_the_plain_fit(make_grpo, make_data, saved_tiny_llama, beta):
    """ModelParallelStrategy (FSDP2, one CPU process): the same completions, update and weights as no strategy; with
    a KL term, from a frozen reference that is sharded too."""
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy

    path = saved_tiny_llama(2)
    weights = []
    for strategy in ("auto", ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)):
        module = make_grpo(model=path, model_config=None, logprob_backend="reference", beta=beta)
        try:
            make_trainer(max_steps=2, strategy=strategy).fit(module, make_data(batch_size=2))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        weights.append(dict(full_weights(module.policy)))
        assert is_fully_sharded(module.policy) == (strategy != "auto")
        assert [is_fully_sharded(r) for r in module._frozen_reference] == ([strategy != "auto"] if beta else [])
    plain, sharded = weights
    assert sharded.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(sharded[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    start = dict(full_weights(load_policy(path)[0]))
    assert any(not torch.equal(plain[n], start[n]) for n in plain)  # the two steps moved the weights


@pytest.mark.parametrize("method", ["ppo", "dpo", "dpo-live"])
def test_ppo_and_dpo_train_their_sharded_modules_under_model_parallel_strategy(method, saved_tiny_llama, prompt_rows):
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_rl import DPO, PPO, PreferenceDataModule, PromptDataModule, SamplingConfig

    path = saved_tiny_llama(2)
    if method == "ppo":
        module = PPO(reward_funcs=[lambda prompts, completions, **k: [float(len(c)) for c in completions]],
                     model=path, critic_model=path, sampling=SamplingConfig(max_new_tokens=6), learning_rate=1e-3,
                     logprob_backend="reference")
        data = PromptDataModule(train_data=prompt_rows, batch_size=2)
    else:
        reference = "live" if method == "dpo-live" else "auto"  # live: a frozen copy, not precomputed log-probs
        module = DPO(model=path, learning_rate=1e-3, logprob_backend="reference", reference=reference)
        rows = [{"prompt": f"say {i}", "chosen": "yes", "rejected": "no no"} for i in range(8)]
        data = PreferenceDataModule(train_data=rows, batch_size=2)
    try:
        make_trainer(max_steps=2, strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)).fit(
            module, data)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    trained = module.trainable_parameters()
    assert trained and all(type(p).__name__ == "DTensor" for p in trained)
    assert all(is_fully_sharded(r) for r in module._frozen_reference)
    assert bool(module._frozen_reference) == (method != "dpo")  # PPO's KL reference, DPO's live one: sharded
    after = dict(full_weights(module.policy))
    start = dict(full_weights(load_policy(path)[0]))
    assert any(not torch.equal(after[n], start[n]) for n in start)


def _sharded_grpo_with_a_reference(make_grpo, cpu_mesh, seed=0, **overrides):
    module = make_grpo(seed=seed, beta=0.1, **overrides)
    module.trainer = make_trainer()
    module._device_mesh = cpu_mesh
    module.configure_model()
    return module


def test_the_frozen_reference_is_sharded_and_scores_as_the_plain_copy_then_gives_its_root_back(cpu_mesh, make_grpo):
    """A full fine-tune's frozen reference under FSDP2: each process holds its shards, not the whole model; its
    log-probs are the plain copy's, and the root unit it gathered for them is freed when the context ends."""
    from lightning_rl.logprobs import completion_logprobs

    plain = make_grpo(beta=0.1)
    plain.configure_model()
    module = _sharded_grpo_with_a_reference(make_grpo, cpu_mesh)
    ref = module._frozen_reference[0]
    assert is_fully_sharded(ref) and all(type(p).__name__ == "DTensor" for p in ref.parameters())
    assert not any(p.requires_grad for p in ref.parameters())
    g = torch.Generator().manual_seed(0)
    vocab = ref.config.vocab_size
    p_ids, c_ids = torch.randint(0, vocab, (2, 4), generator=g), torch.randint(0, vocab, (2, 5), generator=g)
    masks = torch.ones_like(p_ids), torch.ones_like(c_ids)
    scored = []
    for m in (plain, module):
        with torch.no_grad(), m.reference_model() as r:
            scored.append(completion_logprobs(r, p_ids, masks[0], c_ids, masks[1], backend="reference")[0])
            if m is module:  # the root unit is gathered inside the context ...
                assert type(ref.lm_head.weight).__name__ != "DTensor"
    torch.testing.assert_close(scored[1], scored[0])
    assert all(type(p).__name__ == "DTensor" for p in ref.parameters())  # ... and a shard again after it


@pytest.mark.parametrize("source", ["tiny", "folder"])
def test_a_sharded_reference_is_checkpointed_whole_and_restored_into_its_shards(cpu_mesh, make_grpo,
                                                                             saved_tiny_llama, source):
    """The first process alone writes a sharded checkpoint's metadata, so the reference goes in as full tensors
    (a random tiny model's) or as the fingerprint of its full weights (a source rebuilt on load)."""
    overrides = {} if source == "tiny" else {"model": saved_tiny_llama(2), "model_config": None}
    saved = _sharded_grpo_with_a_reference(make_grpo, cpu_mesh, seed=0, **overrides)
    checkpoint = {}
    saved.on_save_checkpoint(checkpoint)
    state = checkpoint["lightning_rl_resume"]
    want = dict(full_weights(saved._frozen_reference[0]))
    if source == "tiny":
        assert all(type(t) is torch.Tensor for t in state["reference"].values())
        resumed = _sharded_grpo_with_a_reference(make_grpo, cpu_mesh, seed=1)  # other random weights
        assert any(not torch.equal(t, want[n]) for n, t in full_weights(resumed._frozen_reference[0]))
        resumed.on_load_checkpoint(checkpoint)
        got = dict(full_weights(resumed._frozen_reference[0]))
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
        assert all(type(p).__name__ == "DTensor" for p in resumed._frozen_reference[0].parameters())
    else:
        plain = make_grpo(beta=0.1, **overrides)
        plain.configure_model()
        plain_checkpoint = {}
        plain.on_save_checkpoint(plain_checkpoint)
        torch.testing.assert_close(state["reference_fingerprint"]["fingerprint"],
                                   plain_checkpoint["lightning_rl_resume"]["reference_fingerprint"]["fingerprint"])
        resumed = _sharded_grpo_with_a_reference(make_grpo, cpu_mesh, **overrides)
        resumed.on_load_checkpoint(checkpoint)  # the rebuilt reference passes the check
        with torch.no_grad():
            next(resumed._frozen_reference[0].parameters()).to_local().add_(1.0)
        with pytest.raises(ValueError, match="differs from the one this checkpoint was trained"):
            resumed.on_load_checkpoint(checkpoint)


def test_gathered_bytes_count_the_root_unit_and_two_layers(cpu_mesh, saved_tiny_llama):
    from lightning_rl.compiled_layers import decoder_layers
    from lightning_rl.plugins.memory_plan import fsdp2_gathered_bytes

    model = load_policy(saved_tiny_llama(3))[0]
    assert fsdp2_gathered_bytes([model]) == 0
    layers = [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in decoder_layers(model)]
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    fully_shard_policy(model, cpu_mesh)
    assert fsdp2_gathered_bytes([model]) == total - sum(layers) + 2 * max(layers)


def test_the_plan_counts_a_sharded_references_shards_and_its_gathered_root_beside_the_policys(cpu_mesh, make_grpo):
    """The reference's shards stay on the device. Its root and two layers are gathered inside its own forward,
    which can run while the policy's root is still gathered after the policy's forward (DPO's pair loss, PPO's and
    GRPO's preparation): the plan counts the policy's root, then the larger of its two layers and the reference's
    gathered set."""
    from lightning_rl import MemoryAwarePrecision
    from lightning_rl.plugins.memory_plan import fsdp2_gathered_bytes, fsdp2_gathered_parts

    module = _sharded_grpo_with_a_reference(make_grpo, cpu_mesh)
    ref, policy = module._frozen_reference[0], module.policy
    opt = torch.optim.AdamW(policy.parameters())
    plan = MemoryAwarePrecision(memory_budget=4 << 30, frozen_dtype="float32").make_plan(
        module, [opt], torch.device("cpu"))
    parts = plan.train_parts
    (policy_root, policy_layer), (ref_root, ref_layer) = fsdp2_gathered_parts([policy]), fsdp2_gathered_parts([ref])
    assert ref_root > 0 and ref_layer > 0  # sharded
    gathered = parts["FSDP2 gathered weights (root unit and two layers)"]
    assert gathered == policy_root + max(2 * policy_layer, ref_root + 2 * ref_layer)
    assert gathered > max(fsdp2_gathered_bytes([policy]), fsdp2_gathered_bytes([ref]))  # the count before: too low
    assert parts["frozen weights"] == sum(p.to_local().numel() * p.element_size() for p in ref.parameters())

    # what the count stands for: after a policy forward with gradients, the reference's forward gathers its root
    # while the policy's is still whole
    def whole(weight):
        return type(weight).__name__ != "DTensor"

    ids = torch.randint(0, ref.config.vocab_size, (2, 6))
    loss = policy(input_ids=ids, labels=ids).loss
    with torch.no_grad(), module.reference_model() as reference:
        reference(input_ids=ids)
        both = whole(policy.lm_head.weight) and whole(ref.lm_head.weight)
    loss.backward()
    assert both and not whole(ref.lm_head.weight)


def test_the_memory_plugin_converts_before_sharding_and_refuses_a_shard_of_the_wrong_dtype(cpu_mesh,
                                                                                           saved_tiny_llama):
    from lightning_rl import MemoryAwarePrecision

    plugin = MemoryAwarePrecision(frozen_dtype="bfloat16")
    path = saved_tiny_llama(2)
    converted, late = load_policy(path)[0], load_policy(path)[0]
    for m in (converted, late):
        m.model.embed_tokens.requires_grad_(False)
    plugin.convert_before_sharding(converted)
    fully_shard_policy(converted, cpu_mesh)
    plugin.convert_module(converted)  # what the strategy calls afterwards: nothing left to change
    assert converted.model.embed_tokens.weight.dtype == torch.bfloat16
    assert converted.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    fully_shard_policy(late, cpu_mesh)
    with pytest.raises(ValueError, match="convert_before_sharding"):
        plugin.convert_module(late)


@pytest.mark.parametrize(("packed", "beta"), [(False, 0.0), (True, 0.0), (False, 0.5)],
                         ids=["padded", "packed", "kl-reference"])
def test_a_run_under_model_parallel_strategy_resumes_exactly(make_grpo, make_data, saved_tiny_llama, tmp_path,
                                                            packed, beta):
    """Checkpoints of sharded weights and optimizer states: 2 steps + resume to 3 equals 3 steps in one go, with
    the sequences padded and packed (the GPU default, forced here), and with a KL term to a sharded frozen
    reference (rebuilt from the folder on resume, checked against the checkpoint's fingerprint). The rollouts come
    from a copy of the model outside the sharded policy, as a vLLM engine's do: generating with the policy itself
    would run the root's forward first and leave its parameters gathered, which hid a packed update that met them
    sharded."""
    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_rl.rollout import HFEngine

    path = saved_tiny_llama(2)
    engine_model, tokenizer = load_policy(path)
    engine_model.eval()

    def fit(steps, folder, ckpt_path=None):
        module = make_grpo(model=path, model_config=None, pack_sequences=packed, beta=beta)
        module.rollout_engine = HFEngine(lambda: engine_model, tokenizer.pad_token_id, [tokenizer.eos_token_id])
        checkpoints = ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, every_n_train_steps=1)
        trainer = make_trainer(max_steps=steps, strategy=ModelParallelStrategy(data_parallel_size=1,
                                                                               tensor_parallel_size=1),
                               callbacks=[checkpoints], enable_checkpointing=True)
        trainer.fit(module, make_data(batch_size=2, shuffle=True), ckpt_path=ckpt_path)
        assert [is_fully_sharded(r) for r in module._frozen_reference] == ([True] if beta else [])
        return trainer.global_step, {n: t.clone() for n, t in full_weights(module.policy)}

    try:
        steps, whole = fit(3, "whole")
        fit(2, "cut")
        resumed_steps, resumed = fit(3, "cut", ckpt_path=tmp_path / "cut" / "last.ckpt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert steps == resumed_steps == 3
    assert all(torch.equal(resumed[n], whole[n]) for n in whole)


_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("kind", ["full", "adapter", "merged", "save-full", "save-lora"])
def test_a_sharded_policy_is_written_as_the_plain_one(cpu_mesh, saved_tiny_llama, tmp_path, kind):
    """``module.export`` and ``save_policy`` of a policy FSDP2 shards (after a fit under ModelParallelStrategy):
    the weights gathered from the current shards, the files the same as the plain policy's (deepcopy and
    safetensors refused the sharded one)."""
    from safetensors.torch import load_file

    from lightning_rl.export import export_policy
    from lightning_rl.lora import apply_lora
    from lightning_rl.models import save_policy

    path = saved_tiny_llama(2)
    lora = kind in ("adapter", "merged", "save-lora")

    def policy():
        net, tokenizer = load_policy(path)
        if lora:
            torch.manual_seed(0)
            net = apply_lora(net, _LORA)
        with torch.no_grad():  # trained-looking weights (nonzero LoRA B), so the gathered values are the shards'
            for p in net.parameters():
                p.add_(torch.linspace(-0.5, 0.5, p.numel()).view(p.shape))
        return net, tokenizer

    (plain, tokenizer), (sharded, _) = policy(), policy()
    fully_shard_policy(sharded, cpu_mesh)
    ids = torch.randint(0, plain.config.vocab_size, (1, 5))
    with torch.no_grad():
        sharded(input_ids=ids)  # the root unit stays gathered after a forward
    for net, folder in ((plain, "plain"), (sharded, "sharded")):
        if kind.startswith("save"):
            save_policy(net, tokenizer, tmp_path / folder)
        else:
            source = "tiny-llama" if kind == "adapter" else path  # a base that exists nowhere: written beside it
            export_policy(net, tokenizer, tmp_path / folder, source, merge=kind == "merged")
    assert is_fully_sharded(sharded)  # the policy itself is left as it was
    name = "adapter_model.safetensors" if kind == "adapter" else "model.safetensors"
    want, got = load_file(tmp_path / "plain" / name), load_file(tmp_path / "sharded" / name)
    assert want.keys() == got.keys() and len(want) > 0
    for key in want:
        assert torch.equal(got[key], want[key]), key
    if kind == "adapter":  # the base, unloaded from the gathered copy
        want, got = (load_file(tmp_path / run / "base" / "model.safetensors") for run in ("plain", "sharded"))
        assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_the_export_command_reads_the_folder_model_parallel_strategy_writes(make_grpo, make_data, saved_tiny_llama,
                                                                           tmp_path):
    """``lightning-rl export`` of ModelParallelStrategy's default checkpoint, a folder of distributed shards: it
    consolidates it and writes the trained weights (it refused the folder)."""
    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_rl.export import main

    path = saved_tiny_llama(2)
    module = make_grpo(model=path, model_config=None)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=1)
    try:
        make_trainer(max_steps=1, strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
                     callbacks=[checkpoints], enable_checkpointing=True).fit(module, make_data(batch_size=2))
        trained = {n: t.clone() for n, t in full_weights(module.policy)}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    last = tmp_path / "ck" / "last.ckpt"
    assert last.is_dir()  # the distributed layout, ModelParallelStrategy's default
    main(["--ckpt_path", str(last), "--out", str(tmp_path / "out")])
    exported = dict(full_weights(load_policy(str(tmp_path / "out"))[0]))
    assert exported.keys() == trained.keys()
    start = dict(full_weights(load_policy(path)[0]))
    assert any(not torch.equal(trained[n], start[n]) for n in trained)  # one step trained something
    for n in trained:
        torch.testing.assert_close(exported[n], trained[n].to(exported[n].dtype), rtol=0, atol=0, msg=n)
