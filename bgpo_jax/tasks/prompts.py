"""The run's prompt data: training batches, SFT batches and eval sets from config.task.

    task = build_task(config, workdir)   # Task: train / sft TaskDatasets, evals by set name
    task.train_examples(step, n)         # this host's PromptBatch of RL prompts for `step`
    task.sft_batch(step, rows, L)        # tokens [rows, P+L] of prompt + reference answer

Which data a task trains on, its default eval sets, the data task an eval set reads and its SFT
targets come from the task specs (bgpo_jax.tasks.registry).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np
from etils import epath

from bgpo_jax.data import ConcatSource, TaskDataset, demo_examples
from bgpo_jax.tasks import registry
from bgpo_jax.tasks.setup import build_tokenizer, reward_kwargs


@dataclasses.dataclass
class Task:
  """Prompt data of a run: training batches per step, the eval sets, and SFT targets."""
  name: str
  tokenizer: Any
  train: TaskDataset | None  # RL prompts: rl.prompts_per_step per step
  evals: dict  # eval task name -> TaskDataset (in order, no shuffling)
  reward_kwargs: dict
  sft: TaskDataset | None = None  # SFT examples: sft.batch_size per step

  def train_examples(self, step: int, num_prompts: int):
    """This host's PromptBatch for `step` (a pure function of seed and step)."""
    del num_prompts  # fixed by the dataset's batch size
    return self.train.batch(step)

  def sft_batch(self, step: int, rows: int, gen_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [rows, P+L], attention_mask) of prompt + reference answer + <|eot_id|> + EOS fill,
    rows distinct examples (the LLaDA-Instruct format; see `sft_target`)."""
    b = self.sft.batch(step)
    ids, answers = b.prompt_ids, [sft_target(ex) for ex in b.examples]
    if len(ids) != rows:
      raise ValueError(f"SFT batch has {len(ids)} examples for {rows} rows; sft.batch_size must be the global rows")
    tok, attn = self.tokenizer.pad_left(ids, length=self.sft.pad_length)
    eos = self.tokenizer.eos_id
    eot = getattr(self.tokenizer, "eot_id", None)
    resp = np.full((rows, gen_length), eos, np.int32)  # EOS fills the canvas after the answer
    cut = 0
    for i, a in enumerate(answers):
      a_ids = self.tokenizer.encode(a)
      cut += len(a_ids) > gen_length
      if eot is not None:
        a_ids = a_ids + [eot]  # the turn's end, then EOS; cut (with nothing else) when the answer fills L
      a_ids = a_ids[:gen_length]
      resp[i, : len(a_ids)] = a_ids
    if cut:
      logging.warning("SFT step %d: %d of %d reference answers are longer than gen_length %d and were cut",
                      step, cut, rows, gen_length)
    tokens = np.concatenate([tok, resp], axis=1).astype(np.int32)
    mask = np.concatenate([attn, np.ones_like(resp)], axis=1).astype(np.int32)
    return tokens, mask


def sft_target(ex: dict) -> str:
  """The reference answer text SFT trains on: the example's task spec's `sft_target` (tasks
  with a checkable solution).

  `Task.sft_batch` lays it out as LLaDA-Instruct's SFT data: the answer, `<|eot_id|>` (where
  the tokenizer has one and the canvas has room after the answer), then EOS to the end of the
  canvas.
  """
  task = ex["task"]
  spec = registry.find(task)
  if spec is None or spec.sft_target is None:
    raise ValueError(f"SFT needs reference answers; task {task!r} has none (use one of "
                     f"{', '.join(registry.names('sft'))})")
  return spec.sft_target(ex)


def _instructions(config) -> dict | None:
  """config.task.instruction for every task, or None (each spec's own instruction)."""
  if not config.task.instruction:
    return None
  return {name: config.task.instruction for name in registry.names()}


def _train_spec(name: str) -> registry.TaskSpec:
  spec = registry.find(name)
  if spec is None or not spec.is_train_task:
    raise ValueError(f"config.task.name {name!r} is unknown; use one of "
                     f"{sorted(registry.names('train'))} or demo")
  return spec


def _eval_set_names(config, spec: registry.TaskSpec) -> list[str]:
  """config.task.eval_tasks, else the task's default eval sets; each must be a grader."""
  names = list(spec.eval_sets)
  if config.task.eval_tasks:
    names = [s.strip() for s in config.task.eval_tasks.split(",") if s.strip()]
  graders = registry.names("grader")
  unknown = [n for n in names if n not in graders]
  if unknown:
    raise ValueError(f"config.task.eval_tasks names unknown eval sets {unknown}; use some of "
                     f"{sorted(graders)}")
  return names


def _file_sources(config, workdir: str | None) -> tuple[Any, dict]:
  """(train source, {eval set: test source}) of a file-backed task, built into TFDS
  array_record datasets under task.tfds_dir (default WORKDIR/tfds)."""
  t = config.task
  spec = _train_spec(t.name)
  from bgpo_jax.data import tfds_builder  # imports tensorflow_datasets: file-backed tasks only
  tfds_dir = t.tfds_dir or str(epath.Path(workdir or ".") / "tfds")  # epath
  eval_names = _eval_set_names(config, spec)

  def source(task, split):
    kw = {"source_dir": t.data_dir} if t.data_dir else {}
    if registry.get(task).train_file:
      kw = {"files": {"train": [t.train_file]}}
    src, stats = tfds_builder.tfds_source(task, split, data_dir=tfds_dir, **kw)
    if stats.get("bad_rows"):
      logging.warning("%s/%s: %s bad rows skipped (first: %s)", task, split, stats["bad_rows"],
                      stats.get("examples", [])[:3])
    return src

  srcs = [source(n, "train") for n in spec.train_on]
  train_src = srcs[0] if len(srcs) == 1 else ConcatSource(srcs)
  return train_src, {n: source(registry.get(n).source, "test") for n in eval_names}


def build_task(config, workdir: str | None = None) -> Task:
  """The training data and the eval sets named by config.task."""
  tokenizer = build_tokenizer(config)
  t = config.task
  pc, pi = jax.process_count(), jax.process_index()
  common = dict(instructions=_instructions(config), max_prompt_tokens=t.max_prompt_tokens,
                truncation=t.truncation, process_index=pi, process_count=pc)
  if t.name == "demo":
    train_src = demo_examples(t.demo_task, split="train", n=t.demo_train_size, seed=config.seed)
    eval_srcs = {t.demo_task: demo_examples(t.demo_task, split="test", n=t.demo_test_size, seed=config.seed)}
  else:
    train_src, eval_srcs = _file_sources(config, workdir)
  train = TaskDataset(train_src, tokenizer, batch_size=config.rl.prompts_per_step, seed=config.seed,
                      shuffle=True, **common)
  sft = None
  if config.mode == "sft" or config.sft.steps:
    # Its own order (seed + 1): warm-up examples are drawn independently of the RL prompts.
    sft = TaskDataset(train_src, tokenizer, batch_size=config.sft.batch_size, seed=config.seed + 1,
                      shuffle=True, **common)
  # Every host holds the whole eval set in order; tasks.evaluate gives each host its share of a batch.
  eval_common = dict(common, process_index=0, process_count=1)
  evals = {name: TaskDataset(src, tokenizer, batch_size=1, seed=0, shuffle=False, **eval_common)
           for name, src in eval_srcs.items()}
  rk = reward_kwargs(config)
  return Task(t.name, tokenizer, train, evals, rk, sft)
