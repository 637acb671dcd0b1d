"""Rollouts graded: the training step's rollouts and their rewards, and the evaluation passes.

    rollout, rewards, waited = rollout_and_score(sampler, task, params, batch, rng, group_size=G)
    metrics = evaluate(sampler, task, params, rng=rng, batch_size=16)   # eval/<set>/accuracy, ...

Each row is graded by its task's grader (data.dataset.reward_inputs, rewards.grade_batch).
"""

from __future__ import annotations

import json
import time
from typing import Sequence

import jax
import numpy as np

from bgpo_jax import distributed as dist
from bgpo_jax import rewards as rewards_lib
from bgpo_jax import rollout as rollout_lib
from bgpo_jax.data import eval_batches, reward_inputs
from bgpo_jax.tasks.prompts import Task


def rollout_and_score(sampler, task: Task, params, batch, rng, *, group_size: int, chunk: int = 0,
                      return_correct: bool = False, metrics: dict | None = None):
  """Rollouts for a PromptBatch and their rewards: the reward pool scores chunk k while the device
  generates chunk k+1. Returns (Rollout of all rows, rewards [rows], seconds spent waiting on rewards),
  plus, with return_correct, correct [rows] (bool: fully correct answers, for train/accuracy: a reward
  >= 1 is not one when a format bonus or partial credit is on). `metrics` (if given) gets the rows
  graded 0 unjudged, over all hosts: rewards/unrewritable, rewards/non_string."""
  ids = batch.prompt_ids
  tasks, gts, extras = batch.reward_inputs()
  params = sampler.inference_params(params)  # once per step, shared by the chunks
  per = max(1, (chunk // group_size) if chunk else len(ids))
  parts, futures = [], []
  for c, start in enumerate(range(0, len(ids), per)):
    sl = slice(start, start + per)
    r = sampler.sample_ids(params, ids[sl], jax.random.fold_in(rng, c))
    parts.append(r)
    rep = lambda xs: [x for x in xs[sl] for _ in range(group_size)]
    futures.append(rewards_lib.submit_grades(rep(tasks), r.completions, rep(gts), rep(extras), **task.reward_kwargs))
  t0 = time.time()
  grades = [g for f in futures for g in f.result()]
  waited = time.time() - t0
  scores = np.asarray([g.reward for g in grades], np.float32)
  if metrics is not None:
    counts = rewards_lib.flag_counts(grades)
    total = dist.allgather_rows(np.asarray([list(counts.values())], np.float32)).sum(0)
    metrics.update(zip(counts, map(float, total)))
  out = (rollout_lib.concat_rollouts(parts), scores, waited)
  if return_correct:
    out += (np.asarray([g.correct for g in grades], bool),)
  return out


def evaluate(sampler, task: Task, params, *, rng, num_examples: int = 0, batch_size: int = 16,
             records: list | None = None, progress: bool = False) -> dict:
  """Greedy (eval settings) accuracy per eval set. Appends one dict per example to `records`.

  accuracy: the share of fully correct answers (the grade's flag; never the training reward, so a
  format bonus or sudoku's partial credit cannot count as solved). score_mean: the mean of the
  published per-example score (sudoku: fraction of empty cells, d1's metric). reward_mean: the
  mean training reward.

  Any split size on any mesh: every generate call gets `batch_size` rows (data.eval_batches pads
  the last batch by repeating a row) and padding rows are dropped before scoring, so batch_size
  only has to divide over the mesh's batch shards (config.validate checks it).
  """
  out = {}
  all_grades = []
  params = sampler.inference_params(params)  # once per evaluation pass
  pi, pc = jax.process_index(), jax.process_count()
  for name, ds in task.evals.items():
    n = len(ds) if not num_examples else min(num_examples, len(ds))
    grades = []
    for b, (rows, valid) in enumerate(eval_batches(n, batch_size, process_index=pi, process_count=pc)):
      # Each process generates and grades its slice of the (padded) global batch; the grades and
      # completions are gathered, so every process returns the same numbers and records.
      exs = ds.examples_at(rows)
      r = sampler.sample_ids(params, [ds.prompt_ids(ex) for ex in exs], jax.random.fold_in(rng, b * batch_size))
      keep = np.flatnonzero(valid)
      exs, completions = [exs[k] for k in keep], [r.completions[k] for k in keep]
      tasks, gts, extras = reward_inputs(exs)
      g = _gather_grades(rewards_lib.grade_batch(tasks, completions, gts, extras, **task.reward_kwargs), valid)
      grades += g
      if records is not None:
        if pc > 1:
          exs = ds.examples_at(dist.gather_valid(rows, valid))
          everyone_valid = dist.allgather_rows(np.asarray(valid, bool))
          completions = [c for c, v in zip(dist.allgather_strings(r.completions), everyone_valid) if v]
          tasks, gts, extras = reward_inputs(exs)
        # grader + extra let `python -m bgpo_jax.evaluate --score FILE` re-grade without a model.
        for ex, t, extra, comp, gr in zip(exs, tasks, extras, completions, g):
          records.append({"task": name, "grader": t, "index": ex.get("index"), "prompt": ex["messages"],
                          "completion": comp, "reward": gr.reward, "correct": gr.correct,
                          "score": gr.score, "ground_truth": ex["ground_truth"],
                          "extra": json.loads(json.dumps(extra, default=str))})
      if progress and pi == 0:
        print(f"  eval {name}: {len(grades)}/{n} accuracy so far "
              f"{np.mean([x.correct for x in grades]):.3f}", flush=True)
    out.update(_summary(f"eval/{name}/", grades))
    all_grades += grades
  out.update(_summary("eval/", all_grades))
  return out


def _gather_grades(mine: Sequence, valid: np.ndarray) -> list:
  """Every process's grades of one eval batch in global row order (padding rows dropped); `mine`
  holds this process's grades of its valid rows. One process: `mine` itself."""
  if jax.process_count() == 1:
    return list(mine)
  it = iter(mine)
  flags = ("",) + rewards_lib.FLAGS
  local = np.zeros((len(valid), 4), np.float32)  # reward, correct, score, flag; zeros on padding
  for i in np.flatnonzero(valid):
    x = next(it)
    local[i] = (x.reward, x.correct, x.score, flags.index(x.flag))
  return [rewards_lib.Grade(reward=float(r), correct=bool(c), score=float(sc), flag=flags[int(f)])
          for r, c, sc, f in dist.gather_valid(local, valid)]


def _summary(prefix: str, grades: Sequence) -> dict:
  # scored rows (padding excluded), and those graded 0 unjudged (rewards.FLAGS)
  n = {f"{prefix}num_examples": float(len(grades)), **rewards_lib.flag_counts(grades, prefix)}
  if not grades:
    return {f"{prefix}accuracy": 0.0, f"{prefix}score_mean": 0.0, f"{prefix}reward_mean": 0.0, **n}
  return {f"{prefix}accuracy": float(np.mean([g.correct for g in grades])),
          f"{prefix}score_mean": float(np.mean([g.score for g in grades])),
          f"{prefix}reward_mean": float(np.mean([g.reward for g in grades])), **n}
