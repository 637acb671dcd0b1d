"""Tokenizers with one interface: the LLaDA HF tokenizer (tokenizer.json) and a char tokenizer.

Both render the LLaDA chat template (SPEC section 1):
  BOS + for each message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>`
  + (add_generation_prompt) `<|start_header_id|>assistant<|end_header_id|>\\n\\n`
and encode the rendered string, special-token text becoming the special ids (as HF does).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mdm_mask|>"
HEADER_START_TOKEN = "<|start_header_id|>"
HEADER_END_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"


class _ChatTokenizer:
  """Shared chat template, decoding cut-off and left padding. Subclasses set the ids/tokens and
  implement `encode`, `_decode_ids`."""

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  eot_id: int
  mask_id: int
  header_start_id: int
  header_end_id: int
  bos_token: str = BOS_TOKEN
  header_start_token: str = HEADER_START_TOKEN
  header_end_token: str = HEADER_END_TOKEN
  eot_token: str = EOT_TOKEN

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
    raise NotImplementedError

  def render_chat(self, messages: Sequence[Mapping[str, str]],
                  add_generation_prompt: bool = True) -> str:
    """The chat template as text, special tokens written out (e.g. "<|eot_id|>")."""
    parts = [self.bos_token]
    for i, m in enumerate(messages):
      if "role" not in m or "content" not in m:
        raise ValueError(f"message {i} needs 'role' and 'content' keys, got {sorted(m)}")
      parts.append(f"{self.header_start_token}{m['role']}{self.header_end_token}\n\n"
                   f"{m['content'].strip()}{self.eot_token}")
    if add_generation_prompt:
      parts.append(f"{self.header_start_token}assistant{self.header_end_token}\n\n")
    return "".join(parts)

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                          add_generation_prompt: bool = True) -> list[int]:
    """Token ids of render_chat(messages)."""
    return self.encode(self.render_chat(messages, add_generation_prompt))

  def decode(self, ids: Sequence[int] | np.ndarray, stop_at_eos: bool = True,
             skip_special_tokens: bool = True) -> str:
    """ids -> text. stop_at_eos: cut at the first EOS or EOT; mask tokens are always dropped."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if stop_at_eos:
      for j, t in enumerate(ids):
        if t == self.eos_id or t == self.eot_id:
          ids = ids[:j]
          break
    ids = [t for t in ids if t != self.mask_id]
    return self._decode_ids(ids, skip_special_tokens)

  def pad_left(self, sequences: Sequence[Sequence[int]],
               length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads id lists with pad_id -> (tokens int32 [B,P], mask int32 [B,P]; 1 = real token).

    P = length or the longest sequence; a sequence longer than `length` is an error.
    """
    longest = max((len(s) for s in sequences), default=0)
    P = longest if length is None else length
    if longest > P:
      raise ValueError(f"a sequence has {longest} tokens, longer than length {P}; "
                       f"raise length or truncate the prompts")
    tokens = np.full((len(sequences), P), self.pad_id, np.int32)
    mask = np.zeros((len(sequences), P), np.int32)
    for b, s in enumerate(sequences):
      if len(s):
        tokens[b, P - len(s):] = np.asarray(s, np.int32)
        mask[b, P - len(s):] = 1
    return tokens, mask

  @property
  def special_ids(self) -> dict[str, int]:
    return dict(bos=self.bos_id, eos=self.eos_id, pad=self.pad_id, eot=self.eot_id,
                mask=self.mask_id, header_start=self.header_start_id,
                header_end=self.header_end_id)


class CharTokenizer(_ChatTokenizer):
  """Characters as ids (ord(c) for printable ASCII, "\\n", "\\t"); specials in ids 0..5.

  Ids: 0 `<|endoftext|>` (eos = pad), 1 `<|startoftext|>` (bos), 2 `<|mdm_mask|>`,
  3 `<|start_header_id|>`, 4 `<|end_header_id|>`, 5 `<|eot_id|>`. Other characters encode as "?".
  vocab_size 128 = LLaDAConfig.preset("tiny").vocab_size.
  """

  SPECIAL_TOKENS = (EOS_TOKEN, BOS_TOKEN, MASK_TOKEN, HEADER_START_TOKEN, HEADER_END_TOKEN,
                    EOT_TOKEN)

  def __init__(self):
    self.vocab_size = 128
    self.eos_id = self.pad_id = 0
    self.bos_id = 1
    self.mask_id = 2
    self.header_start_id = 3
    self.header_end_id = 4
    self.eot_id = 5
    self._special_to_id = {t: i for i, t in enumerate(self.SPECIAL_TOKENS)}
    self._split = re.compile("(" + "|".join(re.escape(t) for t in self.SPECIAL_TOKENS) + ")")

  @staticmethod
  def _char_id(c: str) -> int:
    o = ord(c)
    return o if (32 <= o < 127 or c in "\n\t") else ord("?")

  def encode(self, text: str) -> list[int]:
    ids: list[int] = []
    for piece in self._split.split(text):
      if piece in self._special_to_id:
        ids.append(self._special_to_id[piece])
      else:
        ids.extend(self._char_id(c) for c in piece)
    return ids

  def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
    out = []
    for t in ids:
      if t < len(self.SPECIAL_TOKENS):
        if not skip_special_tokens:
          out.append(self.SPECIAL_TOKENS[t])
      elif 32 <= t < 127 or t in (9, 10):
        out.append(chr(t))
      # other ids (6..8, 11..31, 127) are unused: drop
    return "".join(out)


def _token_content(v: Any) -> str | None:
  """tokenizer_config values are either a string or {"content": ...}."""
  if isinstance(v, Mapping):
    return v.get("content")
  return v


class HFTokenizer(_ChatTokenizer):
  """A Hugging Face fast tokenizer dir (tokenizer.json + tokenizer_config.json), LLaDA specials.

  Special ids are looked up by content (tokenizer_config's bos/eos/pad tokens, `<|mdm_mask|>`,
  `<|eot_id|>`, the header tokens) in the tokenizer, then in tokenizer_config's
  added_tokens_decoder (the two must agree). vocab_size is the highest id + 1.
  """

  def __init__(self, path: str | os.PathLike):
    from tokenizers import Tokenizer  # local: the char tokenizer needs no HF dependency

    path = os.fspath(path)
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_file):
      raise FileNotFoundError(f"{tok_file} not found; HFTokenizer needs a fast tokenizer "
                              f"(tokenizer.json) in {path}")
    self.tokenizer = Tokenizer.from_file(tok_file)
    cfg_file = os.path.join(path, "tokenizer_config.json")
    cfg: dict[str, Any] = {}
    if os.path.exists(cfg_file):
      with open(cfg_file) as f:
        cfg = json.load(f)
    self.config = cfg
    added = {v["content"]: int(k) for k, v in cfg.get("added_tokens_decoder", {}).items()}

    def lookup(content: str | None, what: str) -> int:
      if content is None:
        raise ValueError(f"no {what} token in {cfg_file}")
      i = self.tokenizer.token_to_id(content)
      if i is not None and content in added and added[content] != i:
        raise ValueError(f"{what} token {content!r} has id {i} in {tok_file} but "
                         f"{added[content]} in {cfg_file}; the two files disagree")
      if i is None:
        i = added.get(content)
      if i is None:
        raise ValueError(f"{what} token {content!r} is neither in the vocabulary of {tok_file} "
                         f"nor in added_tokens_decoder of {cfg_file}")
      return int(i)

    self.bos_token = _token_content(cfg.get("bos_token")) or BOS_TOKEN
    eos_token = _token_content(cfg.get("eos_token")) or EOS_TOKEN
    pad_token = _token_content(cfg.get("pad_token")) or eos_token
    self.bos_id = lookup(self.bos_token, "bos")
    self.eos_id = lookup(eos_token, "eos")
    self.pad_id = lookup(pad_token, "pad")
    self.mask_id = lookup(MASK_TOKEN, "mask")
    self.eot_id = lookup(EOT_TOKEN, "eot")
    self.header_start_id = lookup(HEADER_START_TOKEN, "header start")
    self.header_end_id = lookup(HEADER_END_TOKEN, "header end")
    # Highest id + 1 (ids may be sparse); the model's vocab_size may be larger (LLaDA: 126464).
    self.vocab_size = max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

  def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def read_special_ids(path: str | os.PathLike) -> dict[str, int]:
  """Special ids from a tokenizer_config.json (or its dir) alone, looked up by content."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer_config.json")
  with open(path) as f:
    cfg = json.load(f)
  added = {v["content"]: int(k) for k, v in cfg.get("added_tokens_decoder", {}).items()}
  eos = _token_content(cfg.get("eos_token")) or EOS_TOKEN
  wanted = dict(bos=_token_content(cfg.get("bos_token")) or BOS_TOKEN, eos=eos,
                pad=_token_content(cfg.get("pad_token")) or eos, mask=MASK_TOKEN, eot=EOT_TOKEN,
                header_start=HEADER_START_TOKEN, header_end=HEADER_END_TOKEN)
  missing = [f"{k} ({v!r})" for k, v in wanted.items() if v not in added]
  if missing:
    raise ValueError(f"{path}: special tokens not in added_tokens_decoder: {', '.join(missing)}")
  return {k: added[v] for k, v in wanted.items()}


def load_tokenizer(path: str | os.PathLike) -> CharTokenizer | HFTokenizer:
  """"char" -> CharTokenizer(); otherwise an HF tokenizer dir -> HFTokenizer(path)."""
  if os.fspath(path) == "char":
    return CharTokenizer()
  return HFTokenizer(path)
