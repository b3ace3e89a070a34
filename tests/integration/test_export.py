"""`lightning-rl export` and `module.export`: folders transformers (and vLLM) load, with the module's greedy text."""

import json

import lightning as L
import pytest
import torch
from helpers import high_ids, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_rl import GRPO, PromptDataModule, SamplingConfig
from lightning_rl.__main__ import main
from lightning_rl.export import describe_source

PROMPTS = ["say 3", "what is 4 + 8?"]
NEW_TOKENS = 6
# untied embeddings and a wider init: greedy tokens of a random model are then not decided by rounding
MODEL = {"model": "tiny-llama",
         "model_config": {"num_hidden_layers": 1, "initializer_range": 0.2, "tie_word_embeddings": False}}


def module_greedy(module: GRPO) -> list[str]:
    texts = []
    for p in PROMPTS:  # one at a time: no padding, as in the generate calls below
        rollout = module.generate_rollout([p], sampling=module.val_sampling, num_generations=1)
        texts.append(module.decode_completions(rollout)[0])
    return texts


def hf_greedy(model, tokenizer) -> list[str]:
    texts = []
    for p in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        texts.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LoRA GRPO policy after two optimizer steps, and its checkpoint."""
    tmp = tmp_path_factory.mktemp("export")
    L.seed_everything(0, verbose=False)
    module = GRPO(reward_funcs=[high_ids], lora={"r": 4}, num_generations=2,
                  sampling=SamplingConfig(max_new_tokens=NEW_TOKENS), learning_rate=3e-3, logprob_backend="reference",
                  **MODEL)
    ckpt = ModelCheckpoint(dirpath=tmp, filename="run")
    trainer = make_trainer(max_steps=2, callbacks=[ckpt], enable_checkpointing=True)
    rows = [{"prompt": f"say {i}"} for i in range(8)]
    trainer.fit(module, PromptDataModule(train_data=rows, batch_size=2))
    return module, tmp / "run.ckpt"


def test_cli_export_adapter_round_trip(trained, tmp_path):
    module, ckpt = trained
    out = main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "adapter")])
    config = json.loads((out / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]
    assert base == str((out / "base").resolve())  # a tiny model has no hub id: its base is written alongside
    assert (out / "base" / "config.json").is_file() and "tiny random test model" in (out / "README.md").read_text()
    lora_b = [v for k, v in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # the trained adapter, not a fresh one
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    texts = hf_greedy(model, AutoTokenizer.from_pretrained(out))
    assert texts == module_greedy(module) and all(texts)


def test_cli_export_merged_round_trip(trained, tmp_path):
    module, ckpt = trained
    out = main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "merged"), "--merge"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config  # vLLM loads it
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == module.tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k for k in model.state_dict())
    texts = hf_greedy(model, tokenizer)
    assert texts == module_greedy(module) and all(texts)


def test_an_export_refuses_a_folder_of_other_files_and_replaces_an_earlier_exports_model(trained, tmp_path, capsys,
                                                                                         monkeypatch):
    """A project's own README in ``--out`` is left alone and the export refused; a merged model written over an earlier
    adapter export loads as a plain model (the adapter's config and the base beside it are gone), and the reverse."""
    monkeypatch.delenv("LIGHTNING_RL_TRACEBACK", raising=False)
    module, ckpt = trained
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# my project\n")
    with pytest.raises(SystemExit) as info:
        main(["export", "--ckpt_path", str(ckpt), "--out", str(project)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "already holds files that no export wrote (README.md)" in err and "nothing was written there" in err, err
    assert sorted(p.name for p in project.iterdir()) == ["README.md"]
    assert (project / "README.md").read_text() == "# my project\n"

    out = tmp_path / "policy"
    main(["export", "--ckpt_path", str(ckpt), "--out", str(out)])  # an adapter, its base beside it
    assert (out / "adapter_config.json").is_file() and (out / "base").is_dir()
    (out / "notes.txt").write_text("mine")  # a file the user added to the export folder
    main(["export", "--ckpt_path", str(ckpt), "--out", str(out), "--merge"])
    assert not (out / "adapter_config.json").exists() and not (out / "base").exists()
    assert (out / "notes.txt").read_text() == "mine"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k for k in model.state_dict())
    assert hf_greedy(model, AutoTokenizer.from_pretrained(out)) == module_greedy(module)
    main(["export", "--ckpt_path", str(ckpt), "--out", str(out)])  # and back to an adapter
    assert not (out / "model.safetensors").exists() and (out / "adapter_config.json").is_file()
    assert hf_greedy(AutoPeftModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)) == \
        module_greedy(module)


def test_the_console_command_exits_with_status_zero_after_an_export(trained, tmp_path):
    """``lightning-rl export`` runs as ``sys.exit(console_main())``: a returned path (or CLI object) would be
    printed to stderr with exit status 1 after a successful export."""
    import subprocess
    import sys

    _, ckpt = trained
    out = tmp_path / "by-command"
    code = ("import sys; from lightning_rl.__main__ import console_main; "
            f"sys.argv = ['lightning-rl', 'export', '--ckpt_path', {str(ckpt)!r}, '--out', {str(out)!r}]; "
            "sys.exit(console_main())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "adapter_config.json").is_file() and "exported to" in done.stdout


def test_full_fine_tune_exports_whole_weights_in_the_asked_dtype(tmp_path):
    L.seed_everything(0, verbose=False)
    module = GRPO(reward_funcs=[high_ids], num_generations=2, **MODEL)
    out = module.export(tmp_path / "full", dtype="bfloat16")  # merge=False: nothing to merge, whole weights
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, module.policy.lm_head.weight.to(torch.bfloat16))


def test_adapter_base_of_each_model_source(tmp_path):
    assert describe_source("smollm2-135m-instruct")[0] is None  # de-quantized GGUF: written next to the adapter
    assert "Q4_1 GGUF" in describe_source("smollm2-135m-instruct")[1]
    assert describe_source("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct",
                                                             "the Hugging Face model Qwen/Qwen2.5-0.5B-Instruct")
    assert describe_source(str(tmp_path))[0] == str(tmp_path.resolve())


@pytest.mark.parametrize("cls_name", ["PPO", "ORPO"])
def test_the_checkpoint_names_its_module_class_for_export(tmp_path, cls_name):
    """PPO and ORPO checkpoints share hyperparameter names with other modules: the stored class path decides."""
    from lightning_rl import ORPO, PPO
    from lightning_rl.export import load_for_export
    from lightning_rl.modules.policy import MODULE_CLASS_KEY

    L.seed_everything(0, verbose=False)
    cls = {"PPO": PPO, "ORPO": ORPO}[cls_name]
    extra = {"reward_funcs": [high_ids], "num_generations": 2} if cls_name == "PPO" else {}
    module = cls(**extra, **MODEL)
    module.configure_model()
    trainer = make_trainer(max_steps=0)
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=False)[MODULE_CLASS_KEY].endswith(cls_name)
    assert type(load_for_export(path)) is cls
