"""`specdec.text.encode_prompt`: the one encoder of prompts, with and without a chat template."""

from __future__ import annotations

import pytest
from conftest import make_tiny_tokenizer

from specdec.errors import SpecdecError
from specdec.text import encode_prompt

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<a>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    tok = make_tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_without_a_chat_template(tok):
    plain = tok("the quick fox")["input_ids"]
    assert encode_prompt(tok, "the quick fox") == plain  # chat on, but no template: the text as is
    framed = encode_prompt(tok, "the quick fox", template="Question: {prompt}\nAnswer:")
    assert framed == tok("Question: the quick fox\nAnswer:")["input_ids"]
    with pytest.raises(SpecdecError, match="no chat template: give 'prompt'"):
        encode_prompt(tok, [{"role": "user", "content": "hi"}])


def test_with_a_chat_template(chat_tok):
    templated = chat_tok("<user>the quick fox<a>")["input_ids"]
    assert encode_prompt(chat_tok, "the quick fox") == templated  # a list of ints, not a BatchEncoding
    assert encode_prompt(chat_tok, "the quick fox", template="Q: {prompt}") == templated  # the template wins
    assert encode_prompt(chat_tok, "the quick fox", chat=False) == chat_tok("the quick fox")["input_ids"]
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"}]
    assert encode_prompt(chat_tok, chat, chat=False) == chat_tok("<system>be brief<user>the fox<a>")["input_ids"]
    assert all(type(t) is int for t in encode_prompt(chat_tok, chat))


def test_bad_prompts_give_one_line(chat_tok):
    for prompt, message in [("   ", "empty prompt"), ([], "non-empty list"), ([{"role": "user"}], "non-empty list"),
                            ([{"role": "user", "content": 3}], "non-empty list")]:
        with pytest.raises(SpecdecError, match=message):
            encode_prompt(chat_tok, prompt)
