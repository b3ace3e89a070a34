"""PromptTooLongError names the position in the batch and quotes the prompt's own text."""

import pytest

from lightning_rl import load_policy
from lightning_rl.prompting import PromptTooLongError, encode_prompts, prompt_preview


@pytest.fixture(scope="module")
def tok():
    return load_policy("tiny-llama", {"num_hidden_layers": 1})[1]


def test_prompt_too_long_says_position_in_batch_and_quotes_the_prompt(tok):
    long = "find me in the data " + "x" * 100
    with pytest.raises(PromptTooLongError) as info:
        encode_prompts(tok, ["ok", long], max_prompt_length=8)  # chat template on: quote the prompt, not the template
    msg = str(info.value)
    assert "prompt 1 has" in msg and "its position in this batch, not its dataset row" in msg
    assert repr(long[:60] + "...") in msg and "<|user|>" not in msg


def test_prompt_preview_of_chat_messages():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+2?"}]
    assert prompt_preview(messages) == "what is 2+2?"
    assert prompt_preview([{"role": "assistant", "content": "hi"}]) == "hi"
    assert prompt_preview("short") == "short"
    assert prompt_preview("y" * 70, chars=10) == "y" * 10 + "..."
