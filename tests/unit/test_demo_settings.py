"""The demo's GRPO settings: the module picks the compiled layers itself, and the demo's short run stays eager."""

from lightning_rl import demo
from lightning_rl.compiled_layers import auto_compile_layers


def test_the_demo_leaves_compiling_to_the_module_which_keeps_its_short_lora_run_eager():
    args = demo.parse_args([])
    module, _ = demo.build(args)
    assert module.compile_layers_setting is None and module.lora is not None
    # on a GPU, 24 LoRA steps would not earn the first step's compile (45-90 s there)
    assert not auto_compile_layers("cuda", sharded=False, max_steps=args.steps, lora=True)
