"""Gradients handed off one use at a time: a tied LM head's part leaves for host memory as the backward makes it, not
after every layer's backward, and the sum that reaches the optimizer is autograd's."""

import pytest
import torch

from lightning_rl.early_gradients import gradient_sink, handed_off, set_gradient_sink
from lightning_rl.logprobs import completion_logprobs
from lightning_rl.plugins.host_gradients import HostGradients


def test_a_handed_off_use_gives_its_part_to_the_sink_and_the_other_uses_theirs_to_autograd():
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(5, 4)
    assert handed_off(w) is w  # no sink: the weight itself
    parts = []
    set_gradient_sink(w, parts.append)
    assert gradient_sink(w) is not None
    with torch.no_grad():
        assert handed_off(w) is w  # nothing to differentiate
    (x @ handed_off(w).t()).sum().backward()  # the handed-off use
    assert w.grad is None and len(parts) == 1
    torch.testing.assert_close(parts[0], torch.ones(5, 3).t() @ x)
    (2 * w).sum().backward()  # a plain use: autograd's, as always
    torch.testing.assert_close(w.grad, torch.full((3, 4), 2.0))
    set_gradient_sink(w, None)
    assert gradient_sink(w) is None and handed_off(w) is w


def _tied_policy(tiny_llama_loader):
    model = tiny_llama_loader(2)()  # saved and loaded with from_pretrained; tiny-llama ties its embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model.train()


def _backward(model, part):
    g = torch.Generator().manual_seed(part)
    vocab = model.config.vocab_size
    p_ids, c_ids = torch.randint(0, vocab, (3, 5), generator=g), torch.randint(0, vocab, (3, 6), generator=g)
    logp, ent = completion_logprobs(model, p_ids, torch.ones_like(p_ids), c_ids, torch.ones_like(c_ids),
                                    backend="reference")
    (-logp.mean() - 0.1 * ent.mean()).backward()


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_tied_heads_part_leaves_first_and_the_held_sum_is_autograds(tiny_llama_loader, monkeypatch, micro_batches):
    """With gradients sent to host memory, the tied LM head's part of the gradient leaves at the start of the
    backward instead of waiting for the embedding's part at its end; the held gradients are autograd's, bit for
    bit, with one micro-batch or two."""
    plain = _tied_policy(tiny_llama_loader)
    for part in range(micro_batches):
        _backward(plain, part)
    expected = {n: p.grad.clone() for n, p in plain.named_parameters()}

    model = _tied_policy(tiny_llama_loader)
    held = HostGradients(pin_memory=False)
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    events = []
    leave, take_part = held._leave, held._take_part  # wrapped before attach binds them to the hooks and sinks
    monkeypatch.setattr(held, "_leave", lambda p: events.append(("leave", names[id(p)])) or leave(p))
    monkeypatch.setattr(held, "_take_part", lambda p, g: events.append(("part", names[id(p)])) or take_part(p, g))
    assert held.attach(params.values()) == len(params)
    for part in range(micro_batches):
        _backward(model, part)
    tied = "model.embed_tokens.weight"
    # each backward: the head's part leaves for host memory before any decoder layer's gradient; the embedding's
    # part joins it at the end, and the tied weight leaves once, last
    per_backward = len(events) // micro_batches
    assert per_backward == len(params) + 1
    for start in range(0, len(events), per_backward):
        order = events[start:start + per_backward]
        assert order[0] == ("part", tied) and order[-1] == ("leave", tied), order
        assert any(n.startswith("model.layers.") for _, n in order[1:-1])
    assert all(p.grad is None for p in params.values())
    for name, p in params.items():  # autograd's additions, in its order: the same bits
        torch.testing.assert_close(held.host_gradient(p), expected[name], rtol=0, atol=0, msg=name)
    held.detach()
    assert all(gradient_sink(p) is None for p in params.values())


def test_parts_that_no_other_use_joins_leave_at_the_backwards_end():
    """An untied head: its handed-off part is the whole gradient and leaves when the backward ends; two handed-off
    uses in one backward add up first. Either way the held gradient is autograd's."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    x = torch.randn(5, 4)

    def loss(weight_a, weight_b):
        return (x @ weight_a.t()).square().sum() + (x.flip(0) @ weight_b.t()).sin().sum()

    expected = torch.autograd.grad(loss(w, w), w)[0]
    held = HostGradients(pin_memory=False)
    held.attach([w])
    loss(handed_off(w), w).backward()  # one part, joined by autograd's plain use
    torch.testing.assert_close(held.host_gradient(w), expected, rtol=0, atol=0)
    held.drop()
    loss(handed_off(w), handed_off(w)).backward()  # two parts, no plain use: they leave when the backward ends
    assert w.grad is None and held.holds(w)
    torch.testing.assert_close(held.host_gradient(w), expected, rtol=1e-6, atol=1e-6)
    held.detach()
    assert gradient_sink(w) is None


def test_an_untied_heads_gradient_stays_autograds(tmp_path, monkeypatch):
    """An untied head's gradient is whole when the kernel makes it and leaves through autograd's hook at once:
    handing it off would only copy it back and forth."""
    from lightning_rl.models import load_policy

    net, tok = load_policy("tiny-llama", {"num_hidden_layers": 1, "tie_word_embeddings": False})
    net.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = load_policy(str(tmp_path))[0].train()
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    held = HostGradients(pin_memory=False)
    parts = []
    take_part = held._take_part
    monkeypatch.setattr(held, "_take_part", lambda p, g: parts.append(p) or take_part(p, g))
    held.attach(model.parameters())
    _backward(model, 0)
    assert parts == [] and held.holds(model.get_output_embeddings().weight)


def test_a_part_a_failed_backward_left_is_dropped_with_the_skipped_step():
    """A backward that fails after the handed-off use's part left (no end-of-backward settle then): dropping the
    step forgets the part too, so the next backward's gradient is its own."""

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("boom")

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    x = torch.randn(5, 4)
    held = HostGradients(pin_memory=False)
    held.attach([w])
    failing = Boom.apply(x @ w.t()).sum() + (x.flip(0) @ handed_off(w).t()).sum()  # the handed-off use runs first
    with pytest.raises(RuntimeError, match="boom"):
        failing.backward()
    w.grad = None
    held.drop()
    (x @ handed_off(w).t()).square().sum().backward()
    expected = torch.autograd.grad((x @ w.t()).square().sum(), w)[0]
    torch.testing.assert_close(held.host_gradient(w), expected, rtol=0, atol=0)
