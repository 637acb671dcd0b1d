"""Prompt batches for a training step: sources, instructions, chat template, truncation.

    ds = TaskDataset(source, tokenizer, batch_size=16, seed=0, max_prompt_tokens=256)
    batch = ds.batch(step)   # PromptBatch: messages, ground_truth, extra, tokens [b, P], ...

A source is anything with __len__ and __getitem__(i) -> uniform example (records.py schema):
a plain list (ListSource), a TFDS array_record data source (TfdsSource, no TensorFlow
needed) or a concatenation of sources (ConcatSource, e.g. GSM8K + MATH train). The order is
`order.batch_indices`, a pure function of (seed, step), so resuming at step s replays it.

Instructions are per-task templates in which the literal "{prompt}" stands for the last user
message (the task spec's `instruction`, overridable per task). A final assistant message is a
prefill (mbpp's "[BEGIN]"): the chat template renders the turns before it with the generation
prompt and the prefill's text is appended as plain tokens.

Truncation (max_prompt_tokens): "left" keeps the last max_prompt_tokens tokens (the
generation prompt stays intact); "drop" removes too-long examples from the index space once,
at construction, so batches stay full and the order stays a pure function; "error" raises.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from bgpo_jax.data import order, records
from bgpo_jax.tasks import registry

logger = logging.getLogger(__name__)

TRUNCATION = ("left", "drop", "error")


class Tokenizer(Protocol):
  """The part of bgpo_jax.tokenizer's interface used here."""

  def encode(self, text: str) -> list[int]: ...

  def apply_chat_template(self, messages: list[dict],
                          add_generation_prompt: bool = True) -> list[int]: ...

  def pad_left(self, ids: Sequence[Sequence[int]],
               length: int | None = None) -> tuple[np.ndarray, np.ndarray]: ...


class PromptSource(Protocol):
  def __len__(self) -> int: ...

  def __getitem__(self, i: int) -> Mapping[str, Any]: ...


# ----------------------------------------------------------------------------- sources


class ListSource:
  """In-memory source over a list of uniform examples (no TFDS, no files)."""

  def __init__(self, examples: Sequence[Mapping[str, Any]]):
    missing = [f for f in records.EXAMPLE_FIELDS if examples and f not in examples[0]]
    if missing:
      raise ValueError(f"examples lack fields {missing}; build them with records.load_examples"
                       " or procedural.generate_*")
    self._examples = list(examples)

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, i: int) -> Mapping[str, Any]:
    return self._examples[int(i)]

  def get_many(self, indices: Sequence[int]) -> list[Mapping[str, Any]]:
    return [self._examples[int(i)] for i in indices]


class TfdsSource:
  """Wraps a TFDS data source (random access over array_record); decodes bytes to str."""

  def __init__(self, data_source: Any):
    self._ds = data_source

  def __len__(self) -> int:
    return len(self._ds)

  @staticmethod
  def _decode(ex: Mapping[str, Any]) -> dict:
    return {k: (v.decode("utf-8") if isinstance(v, bytes) else
                int(v) if k == "index" else v) for k, v in ex.items()}

  def __getitem__(self, i: int) -> dict:
    return self._decode(self._ds[int(i)])

  def get_many(self, indices: Sequence[int]) -> list[dict]:
    idx = [int(i) for i in indices]
    getter = getattr(self._ds, "__getitems__", None)
    rows = getter(idx) if getter else [self._ds[i] for i in idx]  # batched read when offered
    return [self._decode(r) for r in rows]


class ConcatSource:
  """Sources back to back: index i reads source k at i - offset_k (e.g. GSM8K + MATH)."""

  def __init__(self, sources: Sequence[PromptSource]):
    if not sources:
      raise ValueError("ConcatSource needs at least one source")
    self._sources = list(sources)
    self._offsets = np.cumsum([0] + [len(s) for s in self._sources])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, i: int) -> Mapping[str, Any]:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"index {i} out of range for ConcatSource of length {len(self)}")
    k = int(np.searchsorted(self._offsets, i, side="right")) - 1
    return self._sources[k][i - int(self._offsets[k])]

  def get_many(self, indices: Sequence[int]) -> list[Mapping[str, Any]]:
    return [self[i] for i in indices]


def as_source(obj: Any) -> PromptSource:
  """list -> ListSource; TFDS data source -> TfdsSource; a source passes through."""
  if isinstance(obj, (ListSource, TfdsSource, ConcatSource)):
    return obj
  if isinstance(obj, (list, tuple)):
    return ListSource(obj)
  if type(obj).__module__.startswith("tensorflow_datasets"):
    return TfdsSource(obj)
  if hasattr(obj, "__len__") and hasattr(obj, "__getitem__"):
    return obj
  raise TypeError(f"cannot use {type(obj).__name__} as a prompt source; pass a list of "
                  "examples or a TFDS data source")


def _get_many(source: PromptSource, indices: Sequence[int]) -> list[Mapping[str, Any]]:
  getter = getattr(source, "get_many", None)
  return getter(indices) if getter else [source[int(i)] for i in indices]


# ----------------------------------------------------------------------------- prompts


def default_instruction(task: str) -> str:
  """The task spec's instruction template; "{prompt}" (the row as it is) for a task no spec
  names."""
  spec = registry.find(task)
  return spec.instruction if spec is not None else registry.PROMPT


def apply_instruction(messages: list[dict], template: str) -> list[dict]:
  """Copy of messages with the last user message put through template ("{prompt}" = it, a
  literal replace, so LaTeX braces in the template are safe)."""
  if template == "{prompt}":
    return [dict(m) for m in messages]
  if "{prompt}" not in template:
    raise ValueError(f"instruction template {template[:60]!r} lacks the '{{prompt}}' "
                     "placeholder for the question; e.g. '{prompt}\\nAnswer in <answer>.'")
  out = [dict(m) for m in messages]
  last_user = max(i for i, m in enumerate(out) if m["role"] == "user")
  out[last_user]["content"] = template.replace("{prompt}", out[last_user]["content"])
  return out


def encode_prompt(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
  """Prompt token ids via the chat template; a final assistant message is a prefill."""
  if messages and messages[-1]["role"] == "assistant":
    head = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    return list(head) + list(tokenizer.encode(messages[-1]["content"]))
  return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


@dataclasses.dataclass
class PromptBatch:
  """One step's prompts for this host (b = batch_size // process_count).

  examples[k]: {task, data_source, split, index, messages, ground_truth, extra} with the
  instruction already applied to messages. tokens / attention_mask are left-padded int32
  [b, P] (None without a tokenizer); attention_mask is 1 on real tokens.
  """
  step: int
  indices: np.ndarray  # [b] positions in the (post-drop) source
  examples: list[dict]
  prompt_ids: list[list[int]] | None
  tokens: np.ndarray | None
  attention_mask: np.ndarray | None
  num_truncated: int  # prompts left-truncated in this batch
  tokens_cut: int  # tokens removed by left truncation in this batch

  @property
  def messages(self) -> list[list[dict]]:
    return [e["messages"] for e in self.examples]

  @property
  def ground_truth(self) -> list[str]:
    return [e["ground_truth"] for e in self.examples]

  @property
  def extra(self) -> list[dict]:
    return [e["extra"] for e in self.examples]

  @property
  def tasks(self) -> list[str]:
    return [e["task"] for e in self.examples]

  def reward_inputs(self) -> tuple[list[str], list[str], list[dict]]:
    """(graders, ground_truths, extras) of the batch's examples (`reward_inputs`)."""
    return reward_inputs(self.examples)


def reward_inputs(examples: Sequence[dict]) -> tuple[list[str], list[str], list[dict]]:
  """(graders, ground_truths, extras) of decoded examples in bgpo_jax.rewards' terms, for
  grade_batch.

  A row grades as its task's grader (TaskSpec.grader_of: a "code" row as "humaneval" for
  check(candidate) tests, "mbpp" for an assert list); a check-format row's extra gains
  "prompt" (its messages), where the grader finds the function stub.
  """
  graders, extras = [], []
  for e in examples:
    extra = dict(e["extra"])
    spec = registry.find(e["task"])
    graders.append(spec.grader_of(extra) if spec is not None else e["task"])
    if extra.get("test_format") == "check":
      extra.setdefault("prompt", e["messages"])
    extras.append(extra)
  return graders, [e["ground_truth"] for e in examples], extras


class TaskDataset:
  """Prompt batches for any step: a pure function of (source, seed, step, host).

  Args:
    source: list of examples, TFDS data source, or PromptSource.
    tokenizer: bgpo_jax.tokenizer interface; None returns messages only (no token ids).
    batch_size: GLOBAL prompts per step; this host gets batch_size // process_count.
    seed: order seed (order.batch_indices).
    shuffle: False walks examples in order (evaluation).
    instructions: per-task templates overriding the specs' ("{prompt}" = question).
    max_prompt_tokens: None = no limit.
    truncation: "left" | "drop" | "error" (module docstring).
    pad_length: P of tokens; default max_prompt_tokens when set (static shapes for jit), else
      the longest prompt of the batch.
  """

  def __init__(self, source: Any, tokenizer: Tokenizer | None = None, *, batch_size: int,
               seed: int = 0, shuffle: bool = True,
               instructions: Mapping[str, str] | None = None,
               max_prompt_tokens: int | None = None, truncation: str = "left",
               pad_length: int | None = None, process_index: int = 0,
               process_count: int = 1):
    if truncation not in TRUNCATION:
      raise ValueError(f"truncation {truncation!r} not in {TRUNCATION}")
    if max_prompt_tokens is not None and tokenizer is None:
      raise ValueError("max_prompt_tokens needs a tokenizer to count tokens")
    if max_prompt_tokens is not None and max_prompt_tokens <= 0:
      raise ValueError(f"max_prompt_tokens {max_prompt_tokens} must be positive")
    if pad_length is not None and max_prompt_tokens is not None and (
        pad_length < max_prompt_tokens):
      raise ValueError(f"pad_length {pad_length} < max_prompt_tokens {max_prompt_tokens}; "
                       "prompts could not fit")
    self.source = as_source(source)
    self.tokenizer = tokenizer
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    self.instructions = dict(instructions or {})
    self.max_prompt_tokens = max_prompt_tokens
    self.truncation = truncation
    self.pad_length = pad_length if pad_length is not None else max_prompt_tokens
    self.process_index = process_index
    self.process_count = process_count
    self.truncated_total = 0
    self.tokens_cut_total = 0
    self.dropped: list[int] = []
    self._kept: np.ndarray | None = None
    if max_prompt_tokens is not None and truncation == "drop":
      self._kept = self._filter_long()
    order.batch_indices(len(self), batch_size, seed, 0, process_index=process_index,
                        process_count=process_count)  # validates the sizes up front

  def _filter_long(self) -> np.ndarray:
    """Source indices whose prompt fits; records and logs the dropped ones."""
    kept = []
    for i in range(len(self.source)):
      n = len(self.prompt_ids(self.example(i)))
      (kept if n <= self.max_prompt_tokens else self.dropped).append(i)
    if self.dropped:
      logger.warning("dropped %d of %d prompts longer than max_prompt_tokens=%d (first: %s)",
                     len(self.dropped), len(self.source), self.max_prompt_tokens,
                     self.dropped[:5])
    if not kept:
      raise ValueError(f"every prompt is longer than max_prompt_tokens="
                       f"{self.max_prompt_tokens}; raise it")
    return np.asarray(kept, np.int64)

  def __len__(self) -> int:
    """Examples in the index space (after "drop" filtering)."""
    return len(self._kept) if self._kept is not None else len(self.source)

  def example(self, i: int, raw: Mapping[str, Any] | None = None) -> dict:
    """Decoded example at source index i, instruction applied to its messages."""
    ex = records.decode_example(raw if raw is not None else self.source[int(i)])
    template = self.instructions.get(ex["task"])
    if template is None:
      template = default_instruction(ex["task"])
    ex["messages"] = apply_instruction(ex["messages"], template)
    return ex

  def source_index(self, position: int) -> int:
    """Source index of the position-th example of the index space (after "drop" filtering)."""
    if not 0 <= int(position) < len(self):
      raise IndexError(f"position {position} out of range for {len(self)} examples")
    return int(self._kept[position]) if self._kept is not None else int(position)

  def examples_at(self, positions: Sequence[int]) -> list[dict]:
    """Decoded examples at positions of the index space (0 .. len(self) - 1), in order.

    Positions, not source indices: with truncation "drop" the two differ (evaluation walks
    positions, `example(i)` takes a source index)."""
    idx = [self.source_index(p) for p in positions]
    return [self.example(i, raw) for i, raw in zip(idx, _get_many(self.source, idx))]

  def prompt_ids(self, ex: dict) -> list[int]:
    if self.tokenizer is None:
      raise ValueError("prompt_ids needs a tokenizer; pass one to TaskDataset")
    return encode_prompt(self.tokenizer, ex["messages"])

  def indices(self, step: int) -> np.ndarray:
    """Source indices of this host's share at step, int64 [batch_size // process_count]."""
    pos = order.batch_indices(len(self), self.batch_size, self.seed, step,
                              process_index=self.process_index,
                              process_count=self.process_count, shuffle=self.shuffle)
    return self._kept[pos] if self._kept is not None else pos

  def batch(self, step: int) -> PromptBatch:
    """This host's prompts for `step` (same result whenever and wherever it is called)."""
    idx = self.indices(step)
    examples = [self.example(i, raw) for i, raw in zip(idx, _get_many(self.source, idx))]
    if self.tokenizer is None:
      return PromptBatch(step, idx, examples, None, None, None, 0, 0)
    ids, n_cut, cut = [], 0, 0
    for i, ex in zip(idx, examples):
      p = self.prompt_ids(ex)
      if self.max_prompt_tokens is not None and len(p) > self.max_prompt_tokens:
        if self.truncation == "error":
          raise ValueError(
              f"prompt {int(i)} ({ex['task']}) has {len(p)} tokens > max_prompt_tokens="
              f"{self.max_prompt_tokens}; raise the limit or use truncation='left'/'drop'")
        n_cut += 1
        cut += len(p) - self.max_prompt_tokens
        p = p[len(p) - self.max_prompt_tokens:]
      ids.append(p)
    if n_cut:
      # Warn at the first truncation only (then every step would repeat it); the counts go on in
      # `stats` and in each batch (PromptBatch.truncated / tokens_cut).
      if not self.truncated_total:
        logger.warning("step %d: left-truncated %d of %d prompts (%d tokens) to max_prompt_tokens=%d; later "
                       "truncations are counted, not logged (raise task.max_prompt_tokens to keep whole prompts)",
                       step, n_cut, len(ids), cut, self.max_prompt_tokens)
      self.truncated_total += n_cut
      self.tokens_cut_total += cut
    tokens, mask = self.tokenizer.pad_left(ids, self.pad_length)
    return PromptBatch(step, idx, examples, ids, np.asarray(tokens, np.int32),
                       np.asarray(mask, np.int32), n_cut, cut)

  @property
  def stats(self) -> dict:
    """Truncation counters: dropped at construction, left-truncated so far (this process)."""
    return {"num_examples": len(self), "source_examples": len(self.source),
            "dropped": len(self.dropped), "dropped_first": self.dropped[:5],
            "truncated": self.truncated_total, "tokens_cut": self.tokens_cut_total}
