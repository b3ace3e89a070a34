"""Hyperparameters as plain data: import errors, partials, and optimizer/scheduler factories."""

import functools
import sys
import textwrap

import pytest
import torch

from lightning_rl.hparams import PARTIAL_KEY, import_object, portable, resolve_callable, resolve_factory
from lightning_rl.rewards import numeric_match


def make_sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def scaled(prompts, completions, scale=1.0, **columns):
    return [scale * len(c) for c in completions]


@pytest.fixture
def broken_module(tmp_path, monkeypatch):
    """An importable module that fails while importing (a dependency it needs is missing)."""
    (tmp_path / "bb_broken_rewards.py").write_text(textwrap.dedent("""
        import bb_missing_dependency_xyz

        def ok(prompts, completions, **columns):
            return [1.0] * len(completions)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "bb_broken_rewards"
    sys.modules.pop("bb_broken_rewards", None)


# ------------------------------------------------------------------------------ import errors


def test_module_failing_to_import_names_the_real_error(broken_module):
    with pytest.raises(ImportError, match="importing 'bb_broken_rewards' failed: No module named "
                                          "'bb_missing_dependency_xyz'") as info:
        resolve_callable(f"{broken_module}.ok")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    assert info.value.__cause__.name == "bb_missing_dependency_xyz"


def test_missing_paths_keep_the_plain_message():
    for path in ("bb_no_such_module.fn", "lightning_rl.no_such_module.fn", "lightning_rl.rewards.no_such_fn"):
        with pytest.raises(ImportError, match=f"cannot import '{path}': give an import path such as"):
            import_object(path)
    with pytest.raises(ImportError, match="defined in the script that saved the checkpoint"):
        import_object("__main__.bb_not_defined_here")


def test_attributes_after_the_module_and_submodules_resolve():
    assert import_object("torch.optim.SGD") is torch.optim.SGD
    assert import_object("torch.optim.lr_scheduler.StepLR") is torch.optim.lr_scheduler.StepLR
    assert import_object("lightning_rl.rewards.NumericMatch.__call__") is numeric_match.__class__.__call__


# ------------------------------------------------------------------------------ partials


def test_portable_partial_of_a_class_is_a_class_path_spec():
    spec = portable(functools.partial(torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.95)))
    assert spec == {"class_path": "torch.optim.adamw.AdamW", "init_args": {"lr": 1e-3, "betas": [0.9, 0.95]}}


def test_portable_partial_of_a_function_round_trips_as_a_reward():
    stored = portable([functools.partial(scaled, scale=2.0), functools.partial(scaled)])
    assert stored[0] == {PARTIAL_KEY: f"{__name__}.scaled", "args": [], "keywords": {"scale": 2.0}}
    fn = resolve_callable(stored[0])
    assert isinstance(fn, functools.partial) and fn.func is scaled
    assert fn(["p"], ["abc"]) == [6.0]
    assert resolve_callable(stored[1])(["p"], ["ab"]) == [2.0]


def test_portable_partial_that_cannot_be_stored_is_none():
    class Local:
        pass

    assert portable(functools.partial(lambda x: x)) is None
    assert portable(functools.partial(scaled, scale=Local())) is None
    assert portable(functools.partial(scaled, Local())) is None
    assert portable(functools.partial(scaled, scale=None)) == {PARTIAL_KEY: f"{__name__}.scaled", "args": [],
                                                               "keywords": {"scale": None}}


def test_lightning_cli_optimizer_callable_is_stored_as_its_class_path_spec():
    jsonargparse = pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--opt", type=OptimizerCallable)
    parser.add_argument("--sched", type=LRSchedulerCallable)
    cfg = parser.parse_args(["--opt", '{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.25}}',
                             "--sched", '{"class_path": "torch.optim.lr_scheduler.StepLR", '
                                        '"init_args": {"step_size": 3}}'])
    init = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
    opt_spec, sched_spec = portable(init.opt), portable(init.sched)
    assert opt_spec["class_path"] == "torch.optim.sgd.SGD" and opt_spec["init_args"]["lr"] == 0.25
    assert sched_spec["class_path"] == "torch.optim.lr_scheduler.StepLR"
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = resolve_factory(opt_spec)(params)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.25
    sched = resolve_factory(sched_spec, "lr_scheduler")(opt)
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR) and sched.step_size == 3


# ------------------------------------------------------------------------------ resolve_factory


@pytest.mark.parametrize(
    "given",
    [
        make_sgd,
        f"{__name__}.make_sgd",
        {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
        functools.partial(torch.optim.SGD, lr=0.5),
    ],
)
def test_resolve_factory_round_trips_every_stored_form(given):
    stored = portable(given)  # what a checkpoint holds
    params = [torch.nn.Parameter(torch.zeros(2))]
    for value in (given, stored):
        opt = resolve_factory(value)(params)
        assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.5


def test_resolve_factory_import_path_of_a_class_and_none():
    assert resolve_factory(None) is None
    assert resolve_factory("torch.optim.SGD") is torch.optim.SGD
    halving = resolve_factory({PARTIAL_KEY: "torch.optim.lr_scheduler.StepLR", "args": [],
                               "keywords": {"step_size": 1, "gamma": 0.5}}, "lr_scheduler")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert halving(opt).gamma == 0.5


def test_resolve_factory_errors_name_the_argument_and_the_fix(broken_module):
    with pytest.raises(ImportError, match=r"cannot import 'bb_nowhere\.make'.*'torch\.optim\.SGD'"):
        resolve_factory("bb_nowhere.make")
    with pytest.raises(ImportError, match=r"load_from_checkpoint\(path, lr_scheduler=halving\)"):
        resolve_factory("__main__.halving", "lr_scheduler")
    with pytest.raises(ImportError, match="importing 'bb_broken_rewards' failed"):
        resolve_factory({"class_path": f"{broken_module}.ok"})
    with pytest.raises(TypeError, match=r"optimizer must be a callable, an import path.*got 3"):
        resolve_factory(3)
    with pytest.raises(TypeError, match="resolves to .* which is not callable"):
        resolve_factory("torch.optim.__name__")
