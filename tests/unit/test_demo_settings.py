"""The demo's GRPO settings: a short run skips the compiled layers, whose first-step compile outlasts it."""

from lightning_rl import demo


def test_the_default_demo_runs_its_layers_eagerly_and_a_long_one_leaves_it_to_the_module():
    short, _ = demo.build(demo.parse_args([]))
    assert short.compile_layers_setting is False
    long, _ = demo.build(demo.parse_args(["--steps", str(demo.COMPILE_FROM_STEPS)]))
    assert long.compile_layers_setting is None  # the module's own choice: compiled on CUDA
    assert long.lora is not None and short.lora is not None
