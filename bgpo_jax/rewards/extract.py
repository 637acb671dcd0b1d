"""Answer extraction shared by the task rewards: answer tags, \\boxed{...}, fenced code blocks.

Every task reward first cuts the completion at its first end-of-turn token (`end_of_response`):
decoded LLaDA output keeps `<|eot_id|>` and the `<|endoftext|>` padding after it, and whatever
follows the first one is not part of the answer (the model sometimes writes a second, different
`\\boxed{}` there).
"""

from __future__ import annotations

import re

_ANSWER_OPEN_RE = re.compile(r"<answer>", re.IGNORECASE)
_ANSWER_CLOSE_RE = re.compile(r"</answer>", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*")
# End-of-turn / end-of-text spellings of the LLaMA-3 style (LLaDA), GPT-2 / Qwen and ChatML vocabularies.
_END_RE = re.compile(r"<\|(?:eot_id|endoftext|end_of_text|im_end)\|>")
_FENCE_RE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_LANGS = ("", "python", "py", "python3", "py3")


def end_of_response(text: str) -> str:
  """`text` up to its first end-of-turn token (`<|eot_id|>`, `<|endoftext|>`, ...)."""
  m = _END_RE.search(text)
  return text[:m.start()] if m else text


def answer_tag(text: str) -> str | None:
  """Content of the last `<answer>...</answer>`; an unclosed last `<answer>` (generation cut
  off) yields everything after it. None when there is no answer tag."""
  opened = list(_ANSWER_OPEN_RE.finditer(text))
  if not opened:
    return None
  start = opened[-1].end()
  close = _ANSWER_CLOSE_RE.search(text, start)
  return text[start:close.start() if close else len(text)].strip()


def _braced(text: str, start: int) -> str | None:
  """Content of the balanced {...} group opening at text[start] == "{"."""
  depth = 0
  for i in range(start, len(text)):
    c = text[i]
    if c == "\\":
      continue
    if c == "{" and (i == 0 or text[i - 1] != "\\"):
      depth += 1
    elif c == "}" and text[i - 1] != "\\":
      depth -= 1
      if depth == 0:
        return text[start + 1:i]
  return None


def boxed_all(text: str) -> list[str]:
  """Contents of every `\\boxed{...}` / `\\fbox{...}` with balanced braces, in order.
  `\\boxed 5` (no braces) yields the next whitespace-free token."""
  out = []
  for m in _BOXED_RE.finditer(text):
    i = m.end()
    if i < len(text) and text[i] == "{":
      content = _braced(text, i)
      if content is not None:
        out.append(content.strip())
    elif i < len(text):
      tok = re.match(r"[^\s$]+", text[i:])
      if tok:
        out.append(tok.group(0))
  return out


def last_boxed(text: str) -> str | None:
  """The last `\\boxed{...}` content (several boxed answers: the last one wins)."""
  found = boxed_all(text)
  return found[-1] if found else None


def code_blocks(text: str) -> list[str]:
  """Fenced code blocks (```python ... ``` or bare ```), in order; an unclosed final fence
  (truncated generation) counts up to the end of the text. Non-Python languages are skipped."""
  return [m.group(2) for m in _FENCE_RE.finditer(text) if m.group(1).lower() in _CODE_LANGS]
