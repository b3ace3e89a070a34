"""RolloutAhead (the next batch's rollout in a background thread) and reading the batch Lightning fetched ahead."""

import threading
import time
from types import SimpleNamespace

import pytest

from lightning_rl.callbacks.rollout_ahead import RolloutAhead, next_batch_prompts


def test_take_returns_the_rollout_generated_in_the_background_for_the_same_prompts():
    ahead, started, release = RolloutAhead(), threading.Event(), threading.Event()

    def generate():
        started.set()
        release.wait(5)
        return ("rollout", threading.current_thread().name)

    ahead.submit(["a", "b"], 3, generate)
    assert started.wait(5)  # running while this thread goes on
    time.sleep(0.2)
    release.set()
    (rollout, thread), step = ahead.take(["a", "b"])
    assert rollout == "rollout" and thread.startswith("lightning-rl-rollout") and step == 3
    assert 0.2 <= ahead.last_generate_s < 5  # the generation's own time in the background thread
    assert ahead.pending is None and ahead.take(["a", "b"]) is None
    ahead.close()


def test_a_rollout_for_other_prompts_is_dropped_and_only_one_runs_at_once():
    ahead = RolloutAhead()
    ahead.submit(["a"], 0, lambda: "for a")
    with pytest.raises(RuntimeError, match="already being generated"):
        ahead.submit(["b"], 0, lambda: "for b")
    assert ahead.take(["b"]) is None and ahead.pending is None
    ahead.close()


def test_an_error_while_generating_reaches_the_taker_and_drop_swallows_it():
    ahead = RolloutAhead()

    def boom():
        raise ValueError("prompt longer than the engine allows")

    ahead.submit(["a"], 0, boom)
    with pytest.raises(ValueError, match="longer than the engine allows"):
        ahead.take(["a"])
    ahead.submit(["a"], 0, boom)
    ahead.drop()
    assert ahead.pending is None
    ahead.close()
    ahead.close()  # idempotent


def _trainer(global_step=0, max_steps=-1, num_batches=10, fetched=None):
    fetcher = SimpleNamespace(batches=fetched if fetched is not None else [])
    return SimpleNamespace(global_step=global_step, max_steps=max_steps, num_training_batches=num_batches,
                           fit_loop=SimpleNamespace(_data_fetcher=fetcher))


def test_next_batch_prompts_reads_the_batch_lightning_fetched_ahead():
    nxt = ({"prompt": ["p3", "p4"], "answer": ["7", "8"]}, 1, 0)  # (batch, batch_idx, dataloader_idx)
    assert next_batch_prompts(_trainer(fetched=[nxt]), 0) == ["p3", "p4"]
    assert next_batch_prompts(_trainer(fetched=[nxt[0]]), 0) == ["p3", "p4"]


def test_no_next_prompts_at_the_end_of_the_run_or_the_epoch_or_without_prefetch():
    nxt = [({"prompt": ["p"]}, 1, 0)]
    assert next_batch_prompts(_trainer(global_step=4, max_steps=5, fetched=nxt), 0) is None  # the last step
    assert next_batch_prompts(_trainer(num_batches=3, fetched=nxt), 2) is None  # limit_train_batches / epoch end
    assert next_batch_prompts(_trainer(fetched=[]), 0) is None  # nothing fetched ahead
    assert next_batch_prompts(_trainer(fetched=[([1, 2], 1, 0)]), 0) is None  # not a prompt batch
    assert next_batch_prompts(SimpleNamespace(global_step=0, max_steps=-1), 0) is None  # another loop


def test_peeking_hands_the_same_batches_to_the_loop_and_keeps_the_resume_count_at_what_it_took():
    from lightning_rl.callbacks.rollout_ahead import PeekableBatches
    from lightning_rl.data.sampler import ResumableDataLoader

    loader = ResumableDataLoader(list(range(10)), batch_size=2, shuffle=True, seed=3)
    plain = [b.tolist() for b in loader]
    it = PeekableBatches(iter(loader), [loader])
    taken = [next(it).tolist()]
    assert it.peek().tolist() == plain[1] and it.peek().tolist() == plain[1]  # one look, held
    assert loader.state_dict()["batches"] == 1  # a checkpoint now resumes at the peeked batch
    taken += [b.tolist() for b in it]
    assert taken == plain and loader.state_dict()["batches"] == 5
    assert it.peek() is None
    with pytest.raises(StopIteration):
        next(it)


def test_next_batch_prompts_peeks_a_sized_loaders_iterator_once_per_epoch():
    batches = iter([({"prompt": ["p1"]}, 0, 0), ({"prompt": ["p2"]}, 1, 0)])
    fetcher = SimpleNamespace(batches=[], done=False, iterator=batches)
    trainer = SimpleNamespace(global_step=0, max_steps=-1, num_training_batches=3,
                              fit_loop=SimpleNamespace(_data_fetcher=fetcher, _combined_loader=None))
    assert next_batch_prompts(trainer, 0) == ["p1"]
    wrapped = fetcher.iterator
    assert next_batch_prompts(trainer, 0) == ["p1"] and fetcher.iterator is wrapped
    assert next(fetcher.iterator)[0] == {"prompt": ["p1"]}  # the loop still gets it
    assert next_batch_prompts(trainer, 1) == ["p2"]
    fetcher.done = True
    assert next_batch_prompts(trainer, 1) is None
