"""Tokenizers with one interface: the LLaDA HF tokenizer (tokenizer.json), a char tokenizer, and
Dream's Qwen2 tokenizer (DreamTokenizer, its own `<|im_start|>` chat template).

The first two render the LLaDA chat template (SPEC section 1):
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


# --- Dream (Qwen2 byte-level BPE, `<|im_start|>` chat turns)

IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
DREAM_MASK_TOKEN = "<|mask|>"
DREAM_DEFAULT_SYSTEM = "You are a helpful assistant."
# Qwen2's pre-tokenizer split (contractions, letter runs with one leading non-letter, single
# digits, punctuation runs, newlines, whitespace); its merges assume exactly this split.
QWEN2_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                       r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _qwen2_tokenizer(vocab_file: str, merges_file: str, added: Sequence[tuple[int, str, bool]]):
  """An HF `tokenizers` Tokenizer equal to Qwen2's: NFC, the split above, byte-level BPE, then the
  added tokens (id, content, special) appended in id order (raises if an id does not land)."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

  tok = Tokenizer(models.BPE.from_file(vocab_file, merges_file, unk_token=None, fuse_unk=False,
                                       byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  for i, content, special in sorted(added):
    t = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                   special=special)
    (tok.add_special_tokens if special else tok.add_tokens)([t])
    got = tok.token_to_id(content)
    if got != i:
      raise ValueError(f"added token {content!r} got id {got}, but tokenizer_config.json says {i}; "
                       f"vocab.json and added_tokens_decoder do not fit together")
  return tok


class DreamTokenizer(_ChatTokenizer):
  """Dream-v0's tokenizer dir (vocab.json + merges.txt + tokenizer_config.json; or tokenizer.json).

  Chat template (tokenizer_config.json, without tools): a system turn first (the given one, else
  "You are a helpful assistant."), then `<|im_start|>{role}\\n{content}<|im_end|>\\n` per
  message (content not stripped), then `<|im_start|>assistant\\n` with add_generation_prompt.
  No BOS (add_bos_token is false). Special ids by content: eos = pad = `<|endoftext|>`,
  mask `<|mask|>`, eot `<|im_end|>` (a turn's end stops decoding like LLaDA's `<|eot_id|>`),
  header_start `<|im_start|>`; bos `<|beginoftext|>`.
  """

  bos_token = ""
  header_start_token = IM_START_TOKEN
  header_end_token = ""
  eot_token = IM_END_TOKEN

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    cfg_file = os.path.join(path, "tokenizer_config.json")
    with open(cfg_file) as f:
      cfg = json.load(f)
    self.config = cfg
    added = [(int(k), v["content"], bool(v.get("special", False)))
             for k, v in cfg.get("added_tokens_decoder", {}).items()]
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.exists(vocab) and os.path.exists(merges):
      self.tokenizer = _qwen2_tokenizer(vocab, merges, added)
    elif os.path.exists(os.path.join(path, "tokenizer.json")):
      from tokenizers import Tokenizer
      self.tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    else:
      raise FileNotFoundError(f"{path} has neither vocab.json + merges.txt nor tokenizer.json")
    by_content = {c: i for i, c, _ in added}

    def lookup(content: str | None, what: str) -> int:
      i = by_content.get(content) if content else None
      if i is None and content:
        i = self.tokenizer.token_to_id(content)
      if i is None:
        raise ValueError(f"{what} token {content!r} is not in {cfg_file} added_tokens_decoder nor "
                         f"in the vocabulary of {path}")
      return int(i)

    eos_token = _token_content(cfg.get("eos_token")) or EOS_TOKEN
    self.eos_id = lookup(eos_token, "eos")
    self.pad_id = lookup(_token_content(cfg.get("pad_token")) or eos_token, "pad")
    self.bos_id = lookup(_token_content(cfg.get("bos_token")) or "<|beginoftext|>", "bos")
    self.mask_id = lookup(_token_content(cfg.get("mask_token")) or DREAM_MASK_TOKEN, "mask")
    self.eot_id = lookup(IM_END_TOKEN, "eot")
    self.header_start_id = lookup(IM_START_TOKEN, "im_start")
    self.header_end_id = None
    self.vocab_size = max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

  def render_chat(self, messages: Sequence[Mapping[str, str]],
                  add_generation_prompt: bool = True) -> str:
    """The chat template as text (special tokens written out); tool calls are not supported."""
    for i, m in enumerate(messages):
      if "role" not in m or "content" not in m:
        raise ValueError(f"message {i} needs 'role' and 'content' keys, got {sorted(m)}")
      if m["role"] not in ("system", "user", "assistant"):
        raise ValueError(f"message {i} has role {m['role']!r}; DreamTokenizer renders system / user / "
                         "assistant turns (no tools)")
    turn = lambda role, content: f"{IM_START_TOKEN}{role}\n{content}{IM_END_TOKEN}\n"
    first_system = bool(messages) and messages[0]["role"] == "system"
    parts = [turn("system", messages[0]["content"] if first_system else DREAM_DEFAULT_SYSTEM)]
    parts += [turn(m["role"], m["content"]) for m in messages[int(first_system):]]
    if add_generation_prompt:
      parts.append(f"{IM_START_TOKEN}assistant\n")
    return "".join(parts)

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

  def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def is_dream_tokenizer_dir(path: str | os.PathLike) -> bool:
  """A Dream / Qwen2-style tokenizer dir: tokenizer_class DreamTokenizer, or `<|im_start|>` and
  `<|mask|>` among the added tokens."""
  cfg_file = os.path.join(os.fspath(path), "tokenizer_config.json")
  if not os.path.exists(cfg_file):
    return False
  with open(cfg_file) as f:
    cfg = json.load(f)
  if cfg.get("tokenizer_class") == "DreamTokenizer":
    return True
  contents = {v.get("content") for v in cfg.get("added_tokens_decoder", {}).values()}
  return IM_START_TOKEN in contents and DREAM_MASK_TOKEN in contents


def load_tokenizer(path: str | os.PathLike) -> CharTokenizer | HFTokenizer | DreamTokenizer:
  """"char" -> CharTokenizer(); a Dream tokenizer dir -> DreamTokenizer(path); otherwise an HF
  tokenizer dir -> HFTokenizer(path)."""
  if os.fspath(path) == "char":
    return CharTokenizer()
  if is_dream_tokenizer_dir(path):
    return DreamTokenizer(path)
  return HFTokenizer(path)
