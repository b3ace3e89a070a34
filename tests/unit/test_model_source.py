"""Missing models are refused at once: a mistyped local folder, an unreachable hub, offline mode; a cached model
loads offline."""

import pytest

from lightning_rl import model_source
from lightning_rl import models as models_module
from lightning_rl.models import load_policy, save_policy


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
