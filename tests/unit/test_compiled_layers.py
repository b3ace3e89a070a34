"""Regional compilation of decoder layers: same numbers as eager, one graph for all layers and lengths,
eager outside the update, and a compiler failure that falls back with a warning."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from lightning_rl.compiled_layers import (
    auto_compile_layers,
    compile_decoder_layers,
    compiled_layer_count,
    decoder_layers,
)
from lightning_rl.models import enable_activation_checkpointing


@pytest.fixture
def saved_policy(tiny_llama_loader):
    """Loads a 3-layer tiny-llama saved to a folder with from_pretrained (fp32, eval mode)."""
    return tiny_llama_loader(3)


def run(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, use_cache=False).logits.float()
    logits.square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def test_compiled_layers_match_eager_with_one_graph_for_every_layer_and_length(saved_policy):
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = saved_policy(), saved_policy()
    for m in (eager, compiled):
        enable_activation_checkpointing(m)
        m.train()
    assert compile_decoder_layers(compiled, backend="aot_eager") == 3
    assert compile_decoder_layers(compiled, backend="aot_eager") == 3  # idempotent
    for length in (11, 7, 19):
        ids = torch.randint(0, eager.config.vocab_size, (2, length))
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
        (le, ge), (lc, gc) = run(eager, ids), run(compiled, ids)
        torch.testing.assert_close(lc, le, rtol=0, atol=1e-5)
        for a, b in zip(gc, ge, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


def test_each_model_compiles_its_own_code_so_earlier_models_do_not_use_up_the_recompile_limit(saved_policy):
    """Models compiled one after another in one process (a sweep, a notebook) each get compiled layers: with a
    recompile limit of 1, a second model whose weights need other guards (bf16 instead of fp32) would otherwise
    run its layers eagerly."""
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, 100, (2, 9))
    with torch._dynamo.config.patch(recompile_limit=1):
        for n, dtype in enumerate((torch.float32, torch.bfloat16, torch.float32), start=1):
            model = saved_policy().to(dtype).train()
            compile_decoder_layers(model, backend="aot_eager")
            run(model, ids)
            assert counters["stats"]["unique_graphs"] == n, f"model {n} ran its layers eagerly"
    assert len({id(m.forward.__func__) for m in decoder_layers(model)}) == 1  # its layers share one, as before


def test_update_batches_with_and_without_padding_share_one_graph(saved_policy):
    """A rollout with no padding at all (prompts of one length, every completion at the limit) reuses the graph."""
    from lightning_rl.logprobs import completion_logprobs

    torch._dynamo.reset()
    counters.clear()
    model = saved_policy()
    model.train()
    compile_decoder_layers(model, backend="aot_eager")
    vocab = model.config.vocab_size
    for full in (False, True, False):
        p_ids, c_ids = torch.randint(0, vocab, (3, 5)), torch.randint(0, vocab, (3, 6))
        p_mask, c_mask = torch.ones_like(p_ids), torch.ones_like(c_ids)
        if not full:
            p_mask[0, :2] = 0
            c_mask[1, 4:] = 0
        logp, _ = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, backend="reference")
        logp.sum().backward()
    assert counters["stats"]["unique_graphs"] == 1


def test_generation_and_no_grad_run_the_eager_layers(saved_policy):
    torch._dynamo.reset()
    counters.clear()
    model = saved_policy()
    compile_decoder_layers(model, backend="aot_eager")
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    model.eval()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    model.train()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert counters["stats"]["calls_captured"] == 0


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(saved_policy, caplog):
    torch._dynamo.reset()

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C compiler here")

    eager, model = saved_policy(), saved_policy()
    eager.train()
    model.train()
    compile_decoder_layers(model, backend=broken_backend)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    with caplog.at_level(logging.WARNING, logger="lightning_rl.compiled_layers"):
        out = model(input_ids=ids, use_cache=False).logits
        again = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(out, eager(input_ids=ids, use_cache=False).logits)
    torch.testing.assert_close(again, out)
    warnings = [r for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1 and "no C compiler here" in warnings[0].getMessage()


def test_automatic_compile_is_for_unsharded_layers_on_cuda_full_or_lora():
    assert auto_compile_layers("cuda", sharded=False)  # a full fine-tune and LoRA alike (both measured faster)
    assert auto_compile_layers("cuda", sharded=False, lora=True)
    assert not auto_compile_layers("cuda", sharded=True)
    assert not auto_compile_layers("cpu", sharded=False)


@pytest.mark.parametrize(("max_steps", "lora", "compiled"), [
    (-1, True, True), (0, False, True),  # no limit by steps: a long run
    (199, False, False), (200, False, True),
    (499, True, False), (500, True, True), (200, True, False),
])
def test_a_run_too_short_to_earn_its_first_steps_compile_stays_eager(max_steps, lora, compiled):
    assert auto_compile_layers("cuda", sharded=False, max_steps=max_steps, lora=lora) is compiled


@pytest.mark.parametrize(("max_steps", "lora", "compiled"), [(100, False, False), (1000, False, True),
                                                            (300, True, False), (1000, True, True)])
def test_the_module_resolves_compile_layers_from_the_trainers_max_steps_and_lora(make_grpo, monkeypatch, max_steps,
                                                                                 lora, compiled):
    import lightning as L

    module = make_grpo(model_config={"num_hidden_layers": 2}, lora={"r": 4, "target_modules": "all-linear"}
                       if lora else None)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False)
    module.trainer = trainer
    monkeypatch.setattr(type(trainer.strategy), "root_device", property(lambda self: torch.device("cuda")))
    module.setup("fit")
    assert module.compile_layers is compiled


def test_the_module_compiles_when_asked_and_not_by_default_on_a_cpu(make_grpo):
    module = make_grpo(model_config={"num_hidden_layers": 2})
    assert module.compile_layers_setting is None
    module.setup("fit")
    assert module.compile_layers is False
    module.configure_model()
    assert compiled_layer_count(module.policy) == 0

    asked = make_grpo(model_config={"num_hidden_layers": 2}, compile_layers=True)
    asked.setup("fit")
    asked.configure_model()
    assert compiled_layer_count(asked.policy) == len(decoder_layers(asked.policy)) == 2


def test_checkpointing_goes_through_the_api_an_older_transformers_has():
    class OldModel(torch.nn.Module):
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.kwargs = gradient_checkpointing_kwargs

    old = OldModel()
    enable_activation_checkpointing(old)
    assert old.kwargs == {"use_reentrant": False}
