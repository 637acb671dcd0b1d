"""From a config to the run's pieces: tokenizer, model weights, prompt data, samplers, rewards, eval.

Shared by the trainer (main.py) and the evaluation command (evaluate.py), so both read a config
the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Sequence

import jax
import numpy as np

from bgpo_jax import rewards as rewards_lib
from bgpo_jax import rollout as rollout_lib
from bgpo_jax.data import ConcatSource, TaskDataset, demo_examples, solve_countdown
from bgpo_jax.models import llada
from bgpo_jax.tokenizer import CharTokenizer, load_tokenizer

# A training task and the test splits it is evaluated on by default.
TRAIN_TASKS = {
    "gsm8k": (["gsm8k"], ["gsm8k"]),
    "math": (["gsm8k", "math"], ["gsm8k", "math500"]),
    "countdown": (["countdown"], ["countdown"]),
    "sudoku": (["sudoku"], ["sudoku"]),
    "code": (["code"], ["humaneval", "mbpp"]),
}


# ------------------------------------------------------------------------------------ tokenizer


def build_tokenizer(config):
  if config.tokenizer.kind == "char":
    return CharTokenizer()
  return load_tokenizer(config.tokenizer.path or config.init.checkpoint)


# ------------------------------------------------------------------------------------ model


def build_model(config, tokenizer, mesh) -> tuple[llada.LLaDAConfig, Any]:
  """(model config, params or None for a random init) from config.init / config.model.

  A Hugging Face directory is imported tensor by tensor onto the mesh; an Orbax checkpoint of
  this trainer gives params only (its optimizer state is not carried over).
  """
  from bgpo_jax import checkpoint as ckpt_lib
  from bgpo_jax.models import hf
  from bgpo_jax.train import state as state_lib

  m = config.model
  knobs = dict(param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat_policy=m.remat_policy,
               scan_unroll=m.scan_unroll, attention_impl=m.attention_impl, logits_chunk=m.logits_chunk)
  path = config.init.checkpoint
  if path and os.path.exists(os.path.join(path, "config.json")):
    model_cfg, params = hf.load(path, dtype=None, mesh=mesh)
    model_cfg = dataclasses.replace(model_cfg, **knobs)
    params = jax.tree.map(lambda p: p.astype(model_cfg.param_jnp_dtype), params)
  else:
    arch = {k: m[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size")
            if m[k] is not None}
    if "n_heads" in arch and "n_kv_heads" not in arch:
      arch["n_kv_heads"] = arch["n_heads"]
    model_cfg = llada.LLaDAConfig.preset(m.preset, **arch, **knobs)
    params = None
    if path:
      abstract = state_lib.param_shardings(model_cfg, mesh)
      shapes = jax.eval_shape(lambda: llada.init_params(model_cfg, jax.random.key(0)))
      abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, abstract)
      params = ckpt_lib.restore_params(path, abstract)
  if tokenizer.mask_id != model_cfg.mask_token_id or tokenizer.eos_id != model_cfg.eos_token_id:
    raise ValueError(
        f"the tokenizer's mask/eos ids ({tokenizer.mask_id}, {tokenizer.eos_id}) differ from the model's "
        f"({model_cfg.mask_token_id}, {model_cfg.eos_token_id}); use the checkpoint's own tokenizer "
        "(config.tokenizer) or a preset made for it (tiny/small use the char tokenizer)")
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"tokenizer vocabulary {tokenizer.vocab_size} > model vocab_size {model_cfg.vocab_size}")
  return model_cfg, params


# ------------------------------------------------------------------------------------ data


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
    """(tokens [rows, P+L], attention_mask) of prompt + reference answer + EOS fill, rows distinct examples."""
    b = self.sft.batch(step)
    ids, answers = b.prompt_ids, [sft_target(ex) for ex in b.examples]
    if len(ids) != rows:
      raise ValueError(f"SFT batch has {len(ids)} examples for {rows} rows; sft.batch_size must be the global rows")
    tok, attn = self.tokenizer.pad_left(ids, length=self.sft.pad_length)
    eos = self.tokenizer.eos_id
    resp = np.full((rows, gen_length), eos, np.int32)  # EOS fills the canvas after the answer
    cut = 0
    for i, a in enumerate(answers):
      a_ids = self.tokenizer.encode(a)
      cut += len(a_ids) > gen_length
      a_ids = a_ids[:gen_length]
      resp[i, : len(a_ids)] = a_ids
    if cut:
      logging.warning("SFT step %d: %d of %d reference answers are longer than gen_length %d and were cut",
                      step, cut, rows, gen_length)
    tokens = np.concatenate([tok, resp], axis=1).astype(np.int32)
    mask = np.concatenate([attn, np.ones_like(resp)], axis=1).astype(np.int32)
    return tokens, mask


def sft_target(ex: dict) -> str:
  """The reference answer text SFT trains on (tasks with a checkable solution)."""
  task = ex["task"]
  if task == "sudoku":
    return str(ex["ground_truth"])
  if task == "countdown":
    sol = ex["extra"].get("solution") or solve_countdown(ex["extra"]["numbers"], int(float(ex["ground_truth"])))
    if sol is None:
      raise ValueError(f"countdown example {ex.get('index')} has no solution to train on")
    return str(sol)
  if task in ("gsm8k", "math", "math500"):
    return f"<answer>\\boxed{{{ex['ground_truth']}}}</answer>"
  raise ValueError(f"SFT needs reference answers; task {task!r} has none (use sudoku, countdown or math tasks)")


def _instructions(config) -> dict | None:
  if not config.task.instruction:
    return None
  return {t: config.task.instruction for t in ("gsm8k", "math", "math500", "countdown", "sudoku",
                                                 "humaneval", "mbpp", "code")}


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
    if t.name not in TRAIN_TASKS:
      raise ValueError(f"config.task.name {t.name!r} is unknown; use one of {sorted(TRAIN_TASKS)} or demo")
    from bgpo_jax.data import tfds_builder
    tfds_dir = t.tfds_dir or os.path.join(workdir or ".", "tfds")
    train_names, eval_names = TRAIN_TASKS[t.name]
    if t.eval_tasks:
      eval_names = [s.strip() for s in t.eval_tasks.split(",") if s.strip()]

    def source(task, split):
      kw = {"source_dir": t.data_dir} if t.data_dir else {}
      if task == "code":
        kw = {"files": {"train": [t.train_file]}}
      src, stats = tfds_builder.tfds_source(task, split, data_dir=tfds_dir, **kw)
      if stats.get("bad_rows"):
        logging.warning("%s/%s: %s bad rows skipped (first: %s)", task, split, stats["bad_rows"],
                        stats.get("examples", [])[:3])
      return src

    srcs = [source(n, "train") for n in train_names]
    train_src = srcs[0] if len(srcs) == 1 else ConcatSource(srcs)
    eval_srcs = {n: source(n, "test") for n in eval_names}
  train = TaskDataset(train_src, tokenizer, batch_size=config.rl.prompts_per_step, seed=config.seed,
                      shuffle=True, **common)
  sft = None
  if config.mode == "sft" or config.sft.steps:
    # Its own order (seed + 1): warm-up examples are drawn independently of the RL prompts.
    sft = TaskDataset(train_src, tokenizer, batch_size=config.sft.batch_size, seed=config.seed + 1,
                      shuffle=True, **common)
  # Every host walks the whole eval set in order (the generate call needs the same rows everywhere).
  eval_common = dict(common, process_index=0, process_count=1)
  evals = {name: TaskDataset(src, tokenizer, batch_size=1, seed=0, shuffle=False, **eval_common)
           for name, src in eval_srcs.items()}
  rk = dict(format_reward=config.rl.format_reward, code_timeout_s=config.rewards.code_timeout_s,
            code_memory_mb=config.rewards.code_memory_mb)
  return Task(t.name, tokenizer, train, evals, rk, sft)


# ------------------------------------------------------------------------------------ sampling


def build_rollout_sampler(config, model_cfg, tokenizer, mesh, section: str) -> rollout_lib.RolloutSampler:
  """The training ("rollout") or evaluation ("eval") sampler; eval draws one response per prompt."""
  s = config[section]
  settings = rollout_lib.SamplerSettings(
      gen_length=s.gen_length, steps=s.steps, block_length=s.block_length, temperature=s.temperature,
      remasking=config.rollout.remasking, cfg_scale=config.rollout.cfg_scale)
  group = config.rl.group_size if section == "rollout" else 1
  return rollout_lib.RolloutSampler(tokenizer, model_cfg, settings, group_size=group,
                                    prompt_buckets=tuple(config.rollout.prompt_buckets), mesh=mesh,
                                    truncate_long_prompts=config.task.truncation == "left")


def rollout_and_score(sampler, task: Task, params, batch, rng, *, group_size: int, chunk: int = 0):
  """Rollouts for a PromptBatch and their rewards: the reward pool scores chunk k while the device
  generates chunk k+1. Returns (Rollout of all rows, rewards [rows], seconds spent waiting on rewards)."""
  ids = batch.prompt_ids
  tasks, gts, extras = batch.reward_inputs()
  per = max(1, (chunk // group_size) if chunk else len(ids))
  parts, futures = [], []
  for c, start in enumerate(range(0, len(ids), per)):
    sl = slice(start, start + per)
    r = sampler.sample_ids(params, ids[sl], jax.random.fold_in(rng, c))
    parts.append(r)
    rep = lambda xs: [x for x in xs[sl] for _ in range(group_size)]
    futures.append(rewards_lib.submit_batch(rep(tasks), r.completions, rep(gts), rep(extras), **task.reward_kwargs))
  t0 = time.time()
  scores = [s for f in futures for s in f.result()]
  waited = time.time() - t0
  return rollout_lib.concat_rollouts(parts), np.asarray(scores, np.float32), waited


# ------------------------------------------------------------------------------------ evaluation


def evaluate(sampler, task: Task, params, *, rng, num_examples: int = 0, batch_size: int = 16,
             records: list | None = None, progress: bool = False) -> dict:
  """Greedy (eval settings) accuracy per eval set. Appends one dict per example to `records`."""
  out = {}
  all_scores = []
  for name, ds in task.evals.items():
    n = len(ds) if not num_examples else min(num_examples, len(ds))
    scores = []
    for start in range(0, n, batch_size):
      exs = [ds.example(i) for i in range(start, min(start + batch_size, n))]
      ids = [ds.prompt_ids(ex) for ex in exs]
      r = sampler.sample_ids(params, ids, jax.random.fold_in(rng, start))
      tasks, gts, extras = _reward_inputs(exs)
      s = rewards_lib.score_batch(tasks, r.completions, gts, extras, **task.reward_kwargs)
      scores += s
      if records is not None:
        for ex, comp, sc in zip(exs, r.completions, s):
          records.append({"task": name, "index": ex.get("index"), "prompt": ex["messages"],
                          "completion": comp, "reward": sc, "ground_truth": ex["ground_truth"]})
      if progress:
        print(f"  eval {name}: {min(start + batch_size, n)}/{n} accuracy so far "
              f"{np.mean(np.asarray(scores) >= 1.0):.3f}", flush=True)
    scores = np.asarray(scores, np.float32)
    out[f"eval/{name}/accuracy"] = float((scores >= 1.0).mean())
    out[f"eval/{name}/reward_mean"] = float(scores.mean())
    all_scores.append(scores)
  scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
  out["eval/accuracy"] = float((scores >= 1.0).mean()) if scores.size else 0.0
  out["eval/reward_mean"] = float(scores.mean()) if scores.size else 0.0
  return out


def _reward_inputs(examples: Sequence[dict]):
  from bgpo_jax.data.dataset import PromptBatch
  return PromptBatch(0, np.zeros(len(examples)), list(examples), None, None, None, 0, 0).reward_inputs()
