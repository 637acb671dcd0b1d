"""From a config to the run's pieces: tokenizer, model weights, prompt data, samplers, rewards, eval.

Shared by the trainer (main.py) and the evaluation command (evaluate.py), so both read a config
the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath

from bgpo_jax import config as config_lib
from bgpo_jax import distributed as dist
from bgpo_jax import rewards as rewards_lib
from bgpo_jax import rollout as rollout_lib
from bgpo_jax.data import ConcatSource, TaskDataset, demo_examples, eval_batches, solve_countdown
from bgpo_jax.data import records as records_lib
from bgpo_jax.models import family, llada
from bgpo_jax.tokenizer import CharTokenizer, load_tokenizer

# A training task and the test splits it is evaluated on by default.
TRAIN_TASKS = {
    "gsm8k": (["gsm8k"], ["gsm8k"]),
    "math": (["gsm8k", "math"], ["gsm8k", "math500"]),
    "countdown": (["countdown"], ["countdown"]),
    "sudoku": (["sudoku"], ["sudoku"]),
    "code": (["code"], ["humaneval", "mbpp"]),
}
# Eval set names that read another data task's test split (MATH500 is the "math" task's test
# split: test_math500*.parquet, see data.records._STEMS).
EVAL_DATA_TASK = {"math500": "math"}


# ------------------------------------------------------------------------------------ tokenizer


def _run_record(config):
  """(run.json record, workdir) when config.init.checkpoint is a run of this trainer, else None."""
  from bgpo_jax import checkpoint as ckpt_lib
  path = config.init.checkpoint
  if not path or (epath.Path(path) / "config.json").exists():
    return None  # a Hugging Face directory holds its own tokenizer and config
  return ckpt_lib.find_run_record(path)


def tokenizer_source(config) -> tuple[str, str]:
  """(kind, directory) of the run's tokenizer: config.tokenizer.path, else the tokenizer a
  trainer workdir recorded (WORKDIR/tokenizer, when init.checkpoint is a run), else
  init.checkpoint itself (a Hugging Face directory)."""
  if config.tokenizer.kind == "char":
    return "char", ""
  if config.tokenizer.path:
    return "hf", config.tokenizer.path
  found = _run_record(config)
  if found is not None:
    record, workdir = found
    tok = record.get("tokenizer", {})
    if tok.get("kind") == "char":
      return "char", ""
    if tok.get("path"):
      return "hf", str(epath.Path(workdir) / tok["path"])
  return "hf", config.init.checkpoint


def build_tokenizer(config):
  kind, path = tokenizer_source(config)
  if kind == "char":
    return CharTokenizer()
  if "://" in path:  # HF tokenizers reads local files: copy the small files down
    import tempfile
    local = epath.Path(tempfile.mkdtemp(prefix="bgpo_tok_"))
    for f in epath.Path(path).iterdir():
      if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt")):
        (local / f.name).write_bytes(f.read_bytes())
    path = str(local)
  return load_tokenizer(path)


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
  knobs = dict(param_dtype=m.param_dtype, compute_dtype=m.compute_dtype,
               remat_policy=config_lib.resolved_remat_policy(config),
               scan_unroll=m.scan_unroll, attention_impl=m.attention_impl, logits_chunk=m.logits_chunk)
  path = config.init.checkpoint
  if path and (epath.Path(path) / "config.json").exists():  # epath: gs:// too
    model_cfg, params = hf.load(path, dtype=None, mesh=mesh)
    if family.family_of(model_cfg) != m.family:
      raise ValueError(f"{path} holds a {family.family_of(model_cfg)} checkpoint (config.json model_type) but "
                       f"config.model.family is {m.family!r}; set --config.model.family={family.family_of(model_cfg)}")
    model_cfg = dataclasses.replace(model_cfg, **knobs)
    params = jax.tree.map(lambda p: p.astype(model_cfg.param_jnp_dtype), params)
  else:
    arch = {k: m[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size")
            if m[k] is not None}
    if "n_heads" in arch and "n_kv_heads" not in arch:
      arch["n_kv_heads"] = arch["n_heads"]
    found = _run_record(config) if path else None
    if found is not None and found[0].get("model"):
      # A run of this trainer: its architecture as recorded (e.g. trained from an HF checkpoint).
      model_cfg = dataclasses.replace(family.config_from_hf(found[0]["model"]), **knobs)
    else:
      model_cfg = family.preset(m.family, m.preset, **arch, **knobs)
    params = None
    if path:
      abstract = state_lib.param_shardings(model_cfg, mesh)
      shapes = jax.eval_shape(lambda: family.module_for(model_cfg).init_params(model_cfg, jax.random.key(0)))
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
  """The reference answer text SFT trains on (tasks with a checkable solution).

  `Task.sft_batch` lays it out as LLaDA-Instruct's SFT data: the answer, `<|eot_id|>` (where
  the tokenizer has one and the canvas has room after the answer), then EOS to the end of the
  canvas.
  """
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
    tfds_dir = t.tfds_dir or str(epath.Path(workdir or ".") / "tfds")  # epath
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

    unknown = [n for n in eval_names if EVAL_DATA_TASK.get(n, n) not in records_lib.TASKS or n == "code"]
    if unknown:
      raise ValueError(f"config.task.eval_tasks names unknown eval sets {unknown}; use some of "
                       f"{sorted(set(records_lib.TASKS) - {'code'} | set(EVAL_DATA_TASK))}")
    srcs = [source(n, "train") for n in train_names]
    train_src = srcs[0] if len(srcs) == 1 else ConcatSource(srcs)
    eval_srcs = {n: source(EVAL_DATA_TASK.get(n, n), "test") for n in eval_names}
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


def reward_kwargs(config) -> dict:
  """Keyword arguments of rewards.grade_batch from config.rewards / rl.format_reward. The code
  rewards' SandboxPool (rewards.code_workers programs at once) starts its threads and its
  self-test only when the first code row is graded, so tasks without code pay nothing."""
  r = config.rewards
  return dict(format_reward=config.rl.format_reward, code_timeout_s=r.code_timeout_s,
              code_memory_mb=r.code_memory_mb,
              recipes={"countdown": r.countdown, "sudoku": r.sudoku},
              pool=rewards_lib.SandboxPool(max_workers=r.code_workers or None))


# ------------------------------------------------------------------------------------ sampling


def build_rollout_sampler(config, model_cfg, tokenizer, mesh, section: str) -> rollout_lib.RolloutSampler:
  """The training ("rollout") or evaluation ("eval") sampler; eval draws one response per prompt."""
  s, r = config[section], config.rollout
  settings = rollout_lib.SamplerSettings(
      gen_length=s.gen_length, steps=s.steps, block_length=s.block_length, temperature=s.temperature,
      remasking=r.remasking, cfg_scale=r.cfg_scale, suppress_eos=r.suppress_eos,
      suppress_eos_confidence=r.suppress_eos_confidence, cache=s.cache, threshold=s.threshold)
  group = config.rl.group_size if section == "rollout" else 1
  return rollout_lib.RolloutSampler(tokenizer, model_cfg, settings, group_size=group,
                                    prompt_buckets=tuple(r.prompt_buckets), mesh=mesh,
                                    truncate_long_prompts=config.task.truncation == "left",
                                    gather_weights=r.gather_weights)


def enable_compilation_cache(config, workdir: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache per config.compilation_cache_dir (config.py);
  returns the directory (None when off). Process-wide: the first call of a process decides."""
  d = config.compilation_cache_dir
  if d == "off":
    return None
  if not d:
    # Under the workdir when JAX can write there (local or gs://, through epath); else the user cache.
    remote = workdir and "://" in str(workdir) and not str(workdir).startswith("gs://")
    d = str(epath.Path(workdir) / "jax_cache") if workdir and not remote else os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bgpo_jax", "jax_cache")
  epath.Path(d).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", d)
  # Every program of a run is worth keeping (the sampler's and train step's take seconds; the
  # many small ones are cheap to store).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return d


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


# ------------------------------------------------------------------------------------ evaluation


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
      tasks, gts, extras = _reward_inputs(exs)
      g = _gather_grades(rewards_lib.grade_batch(tasks, completions, gts, extras, **task.reward_kwargs), valid)
      grades += g
      if records is not None:
        if pc > 1:
          exs = ds.examples_at(dist.gather_valid(rows, valid))
          everyone_valid = dist.allgather_rows(np.asarray(valid, bool))
          completions = [c for c, v in zip(dist.allgather_strings(r.completions), everyone_valid) if v]
          tasks, gts, extras = _reward_inputs(exs)
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


def _reward_inputs(examples: Sequence[dict]):
  """(graders, ground truths, extras) of examples: PromptBatch.reward_inputs's mapping (a "code"
  row grades as humaneval or mbpp)."""
  from bgpo_jax.data.dataset import PromptBatch
  return PromptBatch(0, np.zeros(len(examples)), list(examples), None, None, None, 0, 0).reward_inputs()
