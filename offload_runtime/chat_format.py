"""How a conversation becomes text and token ids: the tokenizer's chat template (the document as a
system message when the template renders one as a stable prefix, else in the first user turn), or a
plain "User:/Assistant:" layout for a tokenizer without one. One builder for the chat (turn by turn,
so a new turn is only the text it adds) and the server (a whole conversation per request).
"""
from __future__ import annotations

from typing import Any


def plain_turn(known_text: str, user: str) -> str:
    """A user turn in the plain layout (no chat template), after the text so far."""
    sep = "" if not known_text or known_text.endswith("\n") else "\n"
    return f"{sep}User: {user}\nAssistant:"


class ChatFormat:
    """Turns messages into token ids incrementally, so a new turn is just the text it adds."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.system_document = self.templated and self._supports_system()

    def _supports_system(self) -> bool:
        """The document can be a system message if the template renders one as a stable prefix."""
        system = [{"role": "system", "content": "x"}]
        try:
            alone = self._render(system, False)
            return self._render(system + [{"role": "user", "content": "y"}], True).startswith(alone)
        except Exception:  # templates that reject a system role raise from jinja
            return False

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def describe(self) -> str:
        if self.templated:
            return "the tokenizer's chat template" + ("" if self.system_document else " (document in the first turn)")
        return "a plain 'User:/Assistant:' format (this tokenizer has no chat template)"

    def document_messages(self, document: str | None) -> list[dict]:
        if document and self.system_document:
            return [{"role": "system", "content": "Answer questions about this document.\n\n" + document}]
        return []

    def prefix_text(self, document: str | None) -> str:
        """Text before the first turn (what /reset keeps)."""
        if not self.templated:
            return f"Document:\n{document}\n\n" if document else ""
        messages = self.document_messages(document)
        return self._render(messages, False) if messages else ""

    def conversation(self, messages: list[dict]) -> str:
        """A whole conversation as text, ready for the assistant's answer (the server's prompts): the
        chat template, or the plain layout the chat writes turn by turn. A template may refuse an
        order of roles: its exception passes through."""
        if self.templated:
            return self._render(messages, True)
        text = ""
        for m in messages:
            if m["role"] == "system":
                text += m["content"] + "\n\n"
            elif m["role"] == "user":
                text += plain_turn(text, m["content"])
            else:
                text += m["content"]
        return text

    def turn_text(self, messages: list[dict], known_text: str, user: str) -> str:
        """Text a new user turn adds after `known_text` (everything the context already holds)."""
        if not self.templated:
            return plain_turn(known_text, user)
        full = self._render(messages + [{"role": "user", "content": user}], True)
        if full.startswith(known_text):
            return full[len(known_text):]
        # The template renders the history differently from what the context holds (it trims
        # answers, drops reasoning...): never append the history again, only the new turn as the
        # template renders it after the history.
        history = self._render(messages, False) if messages else ""
        if history and full.startswith(history):
            return self._closing(messages, known_text) + full[len(history):]
        common = 0  # no usable history rendering: append from where the texts diverge
        while common < min(len(full), len(known_text)) and full[common] == known_text[common]:
            common += 1
        return full[common:]

    def _closing(self, messages: list[dict], known_text: str) -> str:
        """What the template writes after the last answer (e.g. "<|im_end|>\n") that the context
        does not end with yet: an answer cut by max-new-tokens or Ctrl-C lacks all of it, one that
        ended with its EOS token lacks the rest."""
        if not messages or messages[-1]["role"] != "assistant":
            return ""
        sentinel = "\x00closing\x00"
        last = dict(messages[-1], content=messages[-1]["content"] + sentinel)
        rendered = self._render(messages[:-1] + [last], False)
        if sentinel not in rendered:
            return ""
        closing = rendered.split(sentinel, 1)[1]
        for k in range(len(closing), 0, -1):  # the longest start of `closing` the context already has
            if known_text.endswith(closing[:k]):
                return closing[k:]
        return closing

    def encode(self, text: str, first: bool) -> list[int]:
        special = first and not self.templated  # a template writes its own BOS
        return self.tokenizer(text, add_special_tokens=special)["input_ids"] if text else []
