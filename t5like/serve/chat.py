"""Chat templates: the messages of a chat request rendered into one prompt text.

A bundle may hold `chat_template.jinja` (the Jinja template of transformers' tokenizers: it sees
`messages` as a list of {role, content} and `add_generation_prompt`); without one, T5-style models
use `DEFAULT_TEMPLATE`, one `role: content` line per message and, for a reply, a final
`assistant:` line. An encoder-decoder model reads the rendered text as its input (EOS appended,
as for every text prompt) and its decoder writes the reply; a decoder-only model continues the
text. Templates run in jinja2's immutable sandbox, so a template cannot reach Python objects.
"""
from __future__ import annotations

import os

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = 'chat_template.jinja'
DEFAULT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")


class ChatTemplateError(ValueError):
  """A template that does not compile or fails to render; the message says which."""


class ChatTemplate:
  def __init__(self, source: str = DEFAULT_TEMPLATE, origin: str = 'default'):
    self.source, self.origin = source, origin
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        keep_trailing_newline=True)

    def raise_exception(message):   # transformers' templates call this on bad conversations
      raise TemplateError(message)
    env.globals['raise_exception'] = raise_exception
    try:
      self._template = env.from_string(source)
    except TemplateError as e:
      raise ChatTemplateError(f'chat template ({origin}) does not compile: {e}') from None

  @classmethod
  def for_bundle(cls, path: str) -> 'ChatTemplate':
    """The bundle's own template when it has one, else the default."""
    f = os.path.join(path, TEMPLATE_FILE)
    if not os.path.isfile(f):
      return cls()
    with open(f, encoding='utf-8') as fh:
      return cls(fh.read(), origin=TEMPLATE_FILE)

  def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    try:
      return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
      raise ChatTemplateError(f'the chat template ({self.origin}) cannot render these messages: '
                              f'{e}') from None
