"""Models that post-process their LM head's logits are refused by the fused log-prob path, which computes raw ones."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_rl.logprobs import backbone_and_head, completion_logprobs

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=50, max_position_embeddings=64)


@pytest.mark.parametrize(("model_type", "extra"), [
    ("gemma2", {"final_logit_softcapping": 30.0, "head_dim": 8}),
    ("cohere", {"logit_scale": 0.0625}),
    ("granite", {"logits_scaling": 8.0}),
])
def test_scaled_or_capped_logits_are_refused_by_name(model_type, extra):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SMALL, **extra))
    attr, value = next(iter((k, v) for k, v in extra.items() if k != "head_dim"))
    with pytest.raises(NotImplementedError, match=rf"post-processes its logits \({attr}={value}\)"):
        backbone_and_head(model)


def test_a_cap_kept_in_the_text_config_of_a_multimodal_lm_is_refused():
    from transformers import Gemma4Config

    config = Gemma4Config(text_config=dict(**{**SMALL, "vocab_size": 300}, head_dim=8, global_head_dim=8,
                                           hidden_size_per_layer_input=0, layer_types=["full_attention"],
                                           final_logit_softcapping=2.0, sliding_window=64),
                          vision_config=None, audio_config=None)
    model = AutoModelForCausalLM.from_config(config)
    assert getattr(model.config, "final_logit_softcapping", None) is None  # only the text config has it
    with pytest.raises(NotImplementedError, match=r"final_logit_softcapping=2.0"):
        backbone_and_head(model)


def test_a_granite_without_scaling_gives_its_own_log_probs():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("granite", **SMALL, logits_scaling=1.0)).double()
    pi, ci = torch.tensor([[3, 4, 5]]), torch.tensor([[6, 7, 8, 9]])
    with torch.no_grad():
        logits = model(input_ids=torch.cat([pi, ci], 1)).logits[0, 2:6]
    want = torch.log_softmax(logits, -1).gather(-1, ci[0, :, None]).squeeze(-1)
    got, _ = completion_logprobs(model, pi, torch.ones_like(pi), ci, torch.ones_like(ci), 1.0, "reference")
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-12)
