"""Text to prompt token ids: owns turning a prompt string or a chat (a list of messages) into the ids decoded.

One encoder serves the API, the batch jobs, the benches and the drafters' calibrations, so every path frames a
prompt the same way: with the tokenizer's chat template when it has one (and `chat` is on), else the plain
text, or the text inside `template` (the benches' "Question: {prompt}\\nAnswer:" frame for tokenizers without
a chat template).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from specdec.chat_template import RAW_HINT, render
from specdec.errors import SpecdecError

Messages = Sequence[Mapping[str, str]]  # [{"role": "user", "content": "..."}, ...]


def encode_prompt(tokenizer: Any, prompt: str | Messages, chat: bool = True, template: str | None = None) -> list[int]:
    """Prompt token ids of `prompt`: a string, or a chat as a list of {"role", "content"} messages.

    A string goes through the chat template as one user message when `chat` is true and the tokenizer has a
    template; otherwise it is tokenized as is, or as ``template.format(prompt=text)`` when a template is given.
    A chat always goes through the chat template. SpecdecError (one line) for an empty prompt, a malformed chat,
    or a chat given to a tokenizer without a template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str):
        _check_utf8(prompt)
        if not prompt.strip():
            raise SpecdecError("empty prompt: give some text to continue")
        if chat and has_template:
            return _chat_ids(tokenizer, [{"role": "user", "content": prompt}])
        text = template.format(prompt=prompt) if template else prompt
        return list(tokenizer(text)["input_ids"])
    _check_messages(prompt)
    for m in prompt:
        _check_utf8(m["content"])
    if not has_template:
        raise SpecdecError("this model's tokenizer has no chat template: give 'prompt' text instead of 'messages'")
    # --raw does not apply to a chat (it always needs the template): the way round a failing one is plain text
    return _chat_ids(tokenizer, list(prompt), hint="give the text as 'prompt' with --raw instead of 'messages'")


def _check_utf8(text: str) -> None:
    """Bytes that were not UTF-8 reach Python as lone surrogates (sys.argv, surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise SpecdecError(f"the prompt is not valid UTF-8 text (position {err.start}): pass UTF-8 text") from None


def _check_messages(messages: Any) -> None:
    if not (isinstance(messages, (list, tuple)) and messages and all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise SpecdecError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} strings")


def _chat_ids(tokenizer: Any, messages: list, hint: str = RAW_HINT) -> list[int]:
    """The chat rendered by the tokenizer's template within time and size limits (`specdec.chat_template`), then
    tokenized without added special tokens: what transformers' apply_chat_template computes."""
    source = tokenizer.get_chat_template() if hasattr(tokenizer, "get_chat_template") else tokenizer.chat_template
    special = dict(getattr(tokenizer, "special_tokens_map", None) or {})
    text = render(source, [dict(m) for m in messages], special, hint)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if hasattr(ids, "tolist"):  # a tensor or an array
        ids = ids.tolist()
    return [int(t) for t in ids]
