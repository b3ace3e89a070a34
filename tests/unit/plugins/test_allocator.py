"""The trainer's CUDA allocator switches to expandable segments (lightning_rl.plugins.allocator)."""

import logging

import pytest

from lightning_rl.plugins import allocator


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, None),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128, expandable_segments:True"}, True),
    ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, False),
    ({"PYTORCH_ALLOC_CONF": "expandable_segments:true"}, True),
])
def test_the_users_own_expandable_segments_setting_is_read_from_the_allocators_variables(environ, expected):
    assert allocator.user_expandable_segments(environ) is expected


@pytest.fixture
def settings(monkeypatch):
    applied = []
    monkeypatch.setattr(allocator, "set_allocator_settings", applied.append)
    for variable in allocator.ALLOC_CONF_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return applied


def test_expandable_segments_are_turned_on_for_a_cuda_device_only(settings):
    assert allocator.enable_expandable_segments("cpu") is False and settings == []
    assert allocator.enable_expandable_segments("cuda:0") is True  # turned on by this call
    assert settings == ["expandable_segments:True"]


@pytest.mark.parametrize("value", ["True", "False"])
def test_a_choice_in_the_users_environment_is_left_as_it_is(settings, monkeypatch, value):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", f"expandable_segments:{value}")
    assert allocator.enable_expandable_segments("cuda:0") is False  # not turned on here: nothing to undo later
    assert settings == []  # nothing applied over the user's setting


def test_disabling_goes_back_to_fixed_segments(settings):
    allocator.disable_expandable_segments()
    assert settings == ["expandable_segments:False"]


def test_the_users_other_allocator_settings_are_kept(settings, monkeypatch):
    """PyTorch can reset the options a settings string applied alone does not name (max_split_size_mb, ...)."""
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128,")
    assert allocator.enable_expandable_segments("cuda:0") is True
    allocator.disable_expandable_segments()
    own = "max_split_size_mb:128"
    assert settings == [f"{own},expandable_segments:True", f"{own},expandable_segments:False"]
    both = {"PYTORCH_ALLOC_CONF": "a:2", "PYTORCH_CUDA_ALLOC_CONF": "b:3"}  # the newer name first, as PyTorch
    assert allocator.with_user_settings("x:1", both) == "a:2,x:1"


def test_an_allocator_without_the_setting_leaves_training_as_it_was_with_a_warning(monkeypatch, caplog):
    for variable in allocator.ALLOC_CONF_VARIABLES:
        monkeypatch.delenv(variable, raising=False)

    def refuse(settings):
        raise RuntimeError("cudaMallocAsync backend has no expandable segments")

    monkeypatch.setattr(allocator, "set_allocator_settings", refuse)
    with caplog.at_level(logging.WARNING):
        assert allocator.enable_expandable_segments("cuda:0") is False
    assert "could not turn on expandable segments" in caplog.text and "cudaMallocAsync" in caplog.text


def test_the_settings_reach_pytorchs_allocator():
    import torch

    try:
        allocator.set_allocator_settings("expandable_segments:True")
        assert "expandable_segments:True" in torch._C._accelerator_getAllocatorSettings()
    finally:
        allocator.set_allocator_settings("expandable_segments:False")  # PyTorch's default, for the other tests
    assert "expandable_segments:False" in torch._C._accelerator_getAllocatorSettings()
