"""Bad settings, bad reward returns, missing models and CLI errors are refused at once, naming the fix."""

import functools
import math

import pytest
import torch

from lightning_rl import DPO, GRPO, ORPO, PPO, model_source
from lightning_rl import models as models_module
from lightning_rl.__main__ import main
from lightning_rl.models import load_policy, save_policy
from lightning_rl.modules.health import collapse_message
from lightning_rl.rewards import RewardError, RewardSet
from lightning_rl.rewards.validation import zero_std_fraction


def zero(prompts, completions, **columns):
    return [0.0] * len(completions)


@pytest.mark.parametrize("cls", [GRPO, PPO, DPO])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampling": {"top_k": -5}}, r"top_k must be a positive number of tokens, or None \(or 0\).*got -5"),
        ({"weight_decay": -5}, r"weight_decay must be >= 0 .*got -5"),
        ({"weight_decay": math.nan}, r"weight_decay must be >= 0"),
        ({"max_grad_norm": -1}, r"max_grad_norm must be > 0 to clip .*or None \(or 0\) to turn clipping off; got -1"),
        ({"max_unscored_steps": -1}, r"max_unscored_steps must be an integer >= 0, got -1"),
    ],
)
def test_bad_settings_of_every_module_fail_at_construction(cls, kwargs, match):
    args = dict(model="tiny-llama", **kwargs)
    if cls is not DPO:
        args["reward_funcs"] = [zero]
    with pytest.raises(ValueError, match=match):
        cls(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon": 0.2, "epsilon_high": 0.1}, r"epsilon_high \(0.1\) is below epsilon \(0.2\).*set it >= epsilon"),
        ({"reward_weights": [math.nan]}, r"reward_weights\[0\] is nan: each weight must be a finite number"),
        ({"reward_weights": [1.0, math.inf], "reward_funcs": [zero, zero]}, r"reward_weights\[1\] is inf"),
    ],
)
def test_bad_grpo_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPO(**{"reward_funcs": [zero], "model": "tiny-llama", **kwargs})


def returns_string(prompts, completions, **columns):
    return "1111"


def returns_scalar(prompts, completions, **columns):
    return 1.0


def returns_text_values(prompts, completions, **columns):
    return ["1"] * len(completions)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (returns_string, r"'returns_string' returned str '1111' for 4 completions; it must return one float"),
        (returns_scalar, r"'returns_scalar' returned float 1.0 for 4 completions; it must return one float"),
        (returns_text_values, r"'returns_text_values' returned '1' for sample 0; expected a float or None"),
    ],
)
def test_unusable_reward_returns_name_the_function(fn, match):
    with pytest.raises(RewardError, match=match):
        RewardSet([fn])(["p"] * 4, ["c"] * 4, {})


def test_array_and_generator_returns_are_still_rewards():
    total, _ = RewardSet([lambda p, c, **k: torch.tensor([1.0, 2.0]), lambda p, c, **k: (0.5 for _ in c)])(
        ["p"] * 2, ["c"] * 2, {})
    assert total.tolist() == [1.5, 2.5]


def test_zero_std_fraction_counts_groups_without_signal():
    nan = math.nan
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, nan, nan, nan, 2.0, 3.0, 3.0, 3.0, 3.0])
    # groups of 2: [1,1] flat, [0,1] signal, [nan,nan] none, [nan,2] one value, [3,3] flat, [3,3] flat
    assert zero_std_fraction(rewards, 2) == pytest.approx(5 / 6)
    assert zero_std_fraction(rewards, 4) == pytest.approx(2 / 3)  # [1,1,0,1] has signal


def test_collapse_message_needs_both_signs():
    assert collapse_message(0.01, 1.0) and "lower learning_rate" in collapse_message(0.01, 1.0)
    assert collapse_message(0.01, 12.0) is None  # confident but still writing
    assert collapse_message(2.0, 1.0) is None  # short answers from a policy that still explores
    assert collapse_message(None, 1.0) is None and collapse_message(math.nan, 1.0) is None


# ----------------------------------------------------------------------------- model sources
def test_a_mistyped_local_model_dir_says_it_does_not_exist(tmp_path):
    net, tok = load_policy("tiny-llama", {"num_hidden_layers": 1})
    save_policy(net, tok, tmp_path / "checkpoints" / "my-model")
    with pytest.raises(FileNotFoundError, match=r"model directory '.*my-modle' does not exist \(looked for .*\); "
                                                r"did you mean .*checkpoints/my-model\?"):
        load_policy(str(tmp_path / "checkpoints" / "my-modle"))
    with pytest.raises(FileNotFoundError, match=r"has no config.json, so it is not a saved transformers model"):
        load_policy(str(tmp_path / "checkpoints"))
    assert load_policy(str(tmp_path / "checkpoints" / "my-model"))[0].config.num_hidden_layers == 1


@pytest.fixture
def no_hub_download(monkeypatch, tmp_path):
    """An empty HF cache, and transformers' loaders replaced by ones that fail the test if reached."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))

    def reached(*args, **kwargs):
        raise AssertionError("transformers was asked to download")

    monkeypatch.setattr(models_module.AutoTokenizer, "from_pretrained", reached)
    monkeypatch.setattr(models_module.AutoModelForCausalLM, "from_pretrained", reached)
    return tmp_path / "hf-cache"


def test_an_unreachable_hub_fails_at_once_saying_where_it_looked(no_hub_download, monkeypatch):
    monkeypatch.setattr(model_source, "hub_endpoint", lambda: "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(OSError, match=r"model 'someone/no-such-model' is not a local directory, not in the Hugging "
                                      rf"Face cache \({no_hub_download}\), and http://127.0.0.1:9 cannot be used"):
        load_policy("someone/no-such-model")


def test_offline_mode_fails_without_a_request(no_hub_download, monkeypatch):
    def probed(*args, **kwargs):
        raise AssertionError("the hub was probed although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(model_source, "hub_unreachable_reason", probed)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"cannot be used \(HF_HUB_OFFLINE is set\)"):
        load_policy("someone/no-such-model")


def test_a_cached_model_loads_offline_when_the_hub_is_unreachable(monkeypatch):
    monkeypatch.setattr(model_source, "hub_endpoint", lambda: "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(model_source, "hub_cached", lambda repo_id: True)
    assert model_source.hub_load_kwargs("someone/cached-model") == {"local_files_only": True}


# ----------------------------------------------------------------------------- CLI
CLI = ["fit", "--config", "examples/grpo_arithmetic.yaml", "--model.init_args.model", "tiny-llama",
       "--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


@pytest.mark.parametrize(
    ("extra", "first_line"),
    [
        (["--model.init_args.epsilon_high", "0.1"],
         "error: model.init_args.epsilon_high (lightning_rl.GRPO): ValueError: epsilon_high (0.1) is below epsilon"),
        (["--model.init_args.sampling.top_k", "-5"],
         "error: model.init_args.sampling.top_k: ValueError: top_k must be a positive number"),
        (["--model.init_args.model", "./checkpoints/no-such-dir"],
         "error: model.init_args.model (lightning_rl.GRPO): FileNotFoundError: model directory "
         "'./checkpoints/no-such-dir' does not exist"),
    ],
    ids=["construction", "sampling", "fit"],
)
def test_cli_errors_lead_with_the_library_message_and_config_key(extra, first_line, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("LIGHTNING_RL_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as info:
        main([*CLI, "--trainer.default_root_dir", str(tmp_path), *extra])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(first_line), err
    assert len(err) == 2 and "LIGHTNING_RL_TRACEBACK=1" in err[1]


def test_cli_traceback_on_request(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_RL_TRACEBACK", "1")
    with pytest.raises(ValueError, match="Does not validate against any of the Union subtypes"):
        main([*CLI, "--trainer.default_root_dir", str(tmp_path), "--model.init_args.epsilon_high", "0.1"])


@pytest.mark.parametrize("cls", [GRPO, PPO, DPO])
def test_an_optimizer_with_a_changed_learning_rate_is_refused(cls):
    args = dict(model="tiny-llama", optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    if cls is not DPO:
        args["reward_funcs"] = [zero]
    with pytest.raises(ValueError, match=r"learning_rate and weight_decay apply to the default AdamW optimizer only "
                                         r"\(got learning_rate=0.001\).*set the learning rate and weight decay in the"):
        cls(learning_rate=1e-3, **args)
    with pytest.raises(ValueError, match=r"\(got weight_decay=0.1\)"):
        cls(weight_decay=0.1, **args)
    cls(**args)  # the optimizer alone is fine


def test_ppo_value_learning_rate_is_its_own_group_whatever_the_optimizer():
    ppo = PPO(reward_funcs=[zero], model="tiny-llama", value_learning_rate=0.5,
              optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    ppo.configure_model()
    policy, value = ppo.configure_optimizers().param_groups
    assert policy["lr"] == 0.1 and value["lr"] == 0.5  # the policy at the optimizer's own rate
    ppo = PPO(reward_funcs=[zero], model="tiny-llama", learning_rate=3e-4)
    ppo.configure_model()
    assert [g["lr"] for g in ppo.configure_optimizers().param_groups] == [3e-4, 3e-4]


def test_orpo_refuses_a_reference_setting():
    with pytest.raises(ValueError, match="ORPO uses no reference model"):
        ORPO(model="tiny-llama", reference="live")
