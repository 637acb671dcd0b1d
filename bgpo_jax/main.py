r"""The trainer: `python -m bgpo_jax.main --config=configs/<task>.py --workdir=DIR [--config.k=v ...]`.

One RL step, read top to bottom in `Trainer.rl_step`:
  prompts (data) -> rollouts (G per prompt, diffusion sampler on the mesh) -> decode -> rewards
  (the sandbox pool scores chunk k while the device generates chunk k+1) -> group advantages ->
  shared MC masks -> (off-policy: stored old terms) -> train step(s) -> metrics.
Around it: evaluation on the test split (also at step 0), Orbax checkpoints every
`checkpoint_every` steps with automatic resume, SIGTERM/SIGINT -> finish the step, save, exit 0.
`mode=sft` (or `sft.steps > 0` before RL) trains with the masked-diffusion SFT loss.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from bgpo_jax import checkpoint as ckpt_lib
from bgpo_jax import config as config_lib
from bgpo_jax import distributed as dist
from bgpo_jax import metrics as metrics_lib
from bgpo_jax import objectives
from bgpo_jax import tasks as tasks_lib
from bgpo_jax.diffusion import masking
from bgpo_jax.train import mesh as mesh_lib
from bgpo_jax.train import optimizer as optim_lib
from bgpo_jax.train import state as state_lib
from bgpo_jax.train import step as step_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when this module is the program (so it stays importable)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, curves.png.")


def fill_after_stop(tokens: np.ndarray, prompt_len: int, response_lengths: np.ndarray,
                    eos_id: int) -> np.ndarray:
  """A copy of tokens [N, P+L] with every response position after the first stop token set to EOS.

  response_lengths [N]: the tokens up to and including the first stop token (L when there is
  none), as `rollout.response_lengths` counts them; the stop token itself (EOS or EOT) is kept.
  """
  tokens = np.array(tokens, copy=True)
  L = tokens.shape[1] - prompt_len
  after = np.arange(L)[None, :] >= np.asarray(response_lengths)[:, None]
  tokens[:, prompt_len:][after] = eos_id
  return tokens


class _Preemption:
  """SIGTERM / SIGINT set a flag; the loop finishes its step, saves and exits 0."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def install(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.requested:  # a second Ctrl-C: stop now
      raise KeyboardInterrupt
    logging.warning("signal %d: finishing this step, saving a checkpoint, then exiting", signum)
    self.requested = True


class Progress:
  """A one-line console progress bar with ETA (plain log lines when not a terminal)."""

  def __init__(self, total: int, start: int, label: str, sft_end: int = 0):
    """sft_end: the step where an SFT warm-up hands over to RL (0 = no warm-up). Until then the
    ETA covers the warm-up only: RL steps cost far more, and their rate is not known yet."""
    self.total, self.start, self.label, self.sft_end = total, start, label, sft_end
    self.tty = sys.stderr.isatty()
    # The rate is measured within the current phase (an RL step costs ~25 SFT steps in the demo).
    self.phase, self.phase_step, self.phase_t0 = None, start, time.time()
    self.last_step, self.last_t = start, self.phase_t0

  def update(self, step: int, info: str, phase: str | None = None) -> None:
    now = time.time()
    if phase != self.phase:
      self.phase, self.phase_step, self.phase_t0 = phase, self.last_step, self.last_t
    self.last_step, self.last_t = step, now
    rate = (now - self.phase_t0) / max(step - self.phase_step, 1)
    if phase == "sft" and step < self.sft_end < self.total:
      eta = f"sft eta {rate * (self.sft_end - step):5.0f}s, then {self.total - self.sft_end} rl steps"
    else:
      eta = f"eta {rate * (self.total - step):5.0f}s"
    frac = step / max(self.total, 1)
    bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
    line = f"{self.label} [{bar}] {step}/{self.total} {eta} {info}"
    if self.tty:
      sys.stderr.write("\r" + line[:200].ljust(200))
      sys.stderr.flush()
      if step >= self.total:
        sys.stderr.write("\n")
    else:
      print(line, flush=True)


class NonFiniteError(ckpt_lib.RunError):
  """optim.max_nonfinite_steps updates in a row had a NaN/Inf loss or gradient norm."""


class Trainer:
  """Holds the run's pieces; `run()` is the whole loop."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = workdir
    mesh_lib.maybe_initialize_distributed(config.distributed)
    self.mesh = mesh_lib.make_mesh(config.mesh.shape)
    self.dp = mesh_lib.data_parallel_size(self.mesh)
    config_lib.validate(config, data_parallel_size=self.dp)
    self.is_main = jax.process_index() == 0
    ckpt_lib.ensure_workdir(workdir)  # one line when it is a file
    # A resume with other settings (seed, lr, ...) would silently continue the old run: refused.
    ckpt_lib.check_run_config(workdir, json.loads(config.to_json_best_effort()),
                              resuming=ckpt_lib.has_checkpoints(workdir), write=self.is_main)
    self.compilation_cache = tasks_lib.enable_compilation_cache(config, workdir)

    self.task = tasks_lib.build_task(config, workdir)
    self.tokenizer = self.task.tokenizer
    self.model_cfg, init_params = tasks_lib.build_model(config, self.tokenizer, self.mesh)
    if self.is_main:
      # What `bgpo_jax.evaluate --checkpoint=WORKDIR` needs besides the weights.
      kind, tok_path = tasks_lib.tokenizer_source(config)
      ckpt_lib.write_run_record(workdir, model_hf=self.model_cfg.to_hf_dict(), tokenizer_kind=kind,
                                tokenizer_path=tok_path)
    self.rng = jax.random.key(config.seed)

    # One optimizer for the whole run; SFT warm-up and RL phases share the step counter.
    self.sft_steps = config.total_steps if config.mode == "sft" else config.sft.steps
    self.rl_steps = 0 if config.mode == "sft" else config.total_steps
    self.total = self.sft_steps + self.rl_steps
    # Optimizer updates of the RL phase (mu per rollout batch): what its lr schedule spans.
    self.rl_updates = self.rl_steps * config.rl.updates_per_batch
    self.optimizer, self.schedule = self._optimizer()
    self.state, self.shardings = state_lib.create_train_state(
        self.model_cfg, self.optimizer, self.mesh, rng=jax.random.fold_in(self.rng, 0), params=init_params)
    # The frozen reference of the KL (rl.kl_beta) is the policy at RL start: without a warm-up the
    # initial weights, copied here before any checkpoint is restored over them; after an SFT
    # warm-up the weights at the hand-over, copied then and saved to WORKDIR/reference.
    self.reference = None
    self.needs_reference = config.mode == "rl" and config.rl.kl_beta > 0
    if self.needs_reference and not self.sft_steps:
      self.reference = self._reference_copy(self.state.params)
    self.ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    self.start_step = 0
    # Updates skipped for a NaN/Inf loss or gradient norm: in all (a metric, kept across resumes)
    # and in a row (optim.max_nonfinite_steps of them stop the run).
    self.nonfinite_total, self.nonfinite_run, self.nonfinite_stop = 0, 0, None
    restored = self.ckpt.restore_latest(self.state)  # damaged newer steps are moved aside
    if restored is not None:
      self.state, host = restored
      self.start_step = int(host["step"])
      self.nonfinite_total = int(host.get("nonfinite_steps", 0))
      logging.info("resumed from %s at step %d", self.ckpt.directory, self.start_step)
    if self.needs_reference and self.reference is None and self.start_step > self.sft_steps:
      self.reference = self._restore_reference()
    for line in objectives.get(config.rl.objective).warnings(config):
      logging.warning("%s", line)
    self.writer = metrics_lib.MetricsWriter(workdir, enabled=self.is_main,
                                            resume_step=self.start_step if restored is not None else None)
    self.sampler = tasks_lib.build_rollout_sampler(config, self.model_cfg, self.tokenizer, self.mesh, "rollout")
    self.eval_sampler = tasks_lib.build_rollout_sampler(config, self.model_cfg, self.tokenizer, self.mesh, "eval")
    self._steps: dict = {}
    self.preempt = _Preemption()
    self.last_eval: dict = {}

  # ------------------------------------------------------------------ pieces

  def _optimizer(self):
    c = self.config
    optim = c.optim
    # SFT (warm-up or mode=sft): the sft.* learning rate, warmup and schedule; AdamW as in optim.
    sft_optim = c.optim.copy_and_resolve_references()
    with sft_optim.unlocked():
      sft_optim.learning_rate = c.sft.learning_rate
      sft_optim.schedule = c.sft.schedule
      sft_optim.final_lr_fraction = c.sft.final_lr_fraction
      sft_optim.warmup_steps = c.sft.warmup_steps
    if c.mode == "sft":
      schedule = optim_lib.make_schedule(sft_optim, self.total)
      return optim_lib.make_optimizer(sft_optim, self.total, schedule), schedule
    if self.sft_steps and self.rl_steps:
      # Warm-up SFT, then RL at optim.learning_rate (after its warmup), over the RL updates.
      sft_lr = optim_lib.make_schedule(sft_optim, self.sft_steps)
      rl = optim_lib.make_schedule(optim, self.rl_updates)
      schedule = optax.join_schedules([sft_lr, rl], [self.sft_steps])
      return optim_lib.make_optimizer(optim, self.sft_steps + self.rl_updates, schedule), schedule
    schedule = optim_lib.make_schedule(optim, self.rl_updates)
    return optim_lib.make_optimizer(optim, self.rl_updates, schedule), schedule

  def _step_config(self, phase: str) -> step_lib.StepConfig:
    c = self.config
    if phase == "sft":
      return step_lib.StepConfig(objective="sft", num_mc_samples=c.sft.num_mc_samples,
                                 micro_batch_size=self._micro_rows("sft"), gen_length=c.rollout.gen_length)
    rl = c.rl
    clip_eps, dual_clip = config_lib.resolved_clip(rl)
    # config.rl keys the objective's Hparams reads beyond the step's own knobs (a registered
    # objective may add its own keys to config.rl).
    knobs = {f.name for f in dataclasses.fields(step_lib.StepConfig)}
    hp_fields = dataclasses.fields(objectives.get(rl.objective).Hparams)
    extra = tuple((f.name, rl[f.name]) for f in hp_fields if f.name not in knobs and f.name in rl)
    return step_lib.StepConfig(
        objective=rl.objective, num_mc_samples=rl.num_mc_samples,
        micro_batch_size=self._micro_rows("rl"), gen_length=c.rollout.gen_length,
        normalize_length=rl.normalize_length, off_policy=rl.updates_per_batch > 1,
        clip_eps=clip_eps, dual_clip=dual_clip, kl_beta=float(rl.kl_beta),
        prompt_mask_prob=rl.prompt_mask_prob, extra=extra)

  def _micro_rows(self, phase: str) -> int:
    c = self.config
    if phase == "sft":
      return config_lib.micro_batch_rows(c.sft.micro_batch_per_device, c.sft.batch_size, self.dp)
    return config_lib.micro_batch_rows(c.rl.micro_batch_per_device, c.rl.prompts_per_step * c.rl.group_size, self.dp)

  def _compiled(self, phase: str, batch: dict):
    """The jitted step for this phase and batch (shapes and keys, old/reference terms included),
    compiled ahead of time once (memory logged)."""
    key = (phase, tuple((k, v.shape) for k, v in sorted(batch.items())))
    if key not in self._steps:
      scfg = self._step_config(phase)
      fn = step_lib.jit_train_step(self.model_cfg, scfg, self.optimizer, self.schedule, self.mesh,
                                   self.shardings, batch)
      t0 = time.time()
      compiled = fn.lower(self.state, batch).compile()
      mem = step_lib.memory_report(compiled)
      logging.info("compiled %s step in %.1fs; per-device memory: %s", phase, time.time() - t0,
                   {k: f"{v / 2**20:.1f} MiB" for k, v in mem.items()})
      self._steps[key] = (compiled, mem)
    return self._steps[key]

  def _terms(self, params, batch: dict):
    """Old-policy or reference terms of `params` on this batch's masks (no gradient)."""
    key = ("terms", tuple((k, v.shape) for k, v in sorted(batch.items())),
           tuple(x.dtype for x in jax.tree.leaves(params)[:1]))
    if key not in self._steps:
      self._steps[key] = step_lib.jit_old_terms(self.model_cfg, self._step_config("rl"), self.mesh,
                                                self.shardings.params, batch)
    return self._steps[key](params, batch)

  def _reference_copy(self, params):
    """A frozen copy of `params` in rl.reference_dtype, on the params' shardings (a new buffer:
    the train step donates the state's)."""
    dtype = jnp.dtype(self.config.rl.reference_dtype)
    fn = jax.jit(lambda p: jax.tree.map(lambda x: jnp.copy(x.astype(dtype)), p),
                 out_shardings=self.shardings.params)
    return fn(params)

  def _reference_dir(self) -> str:
    return self.workdir.rstrip("/") + "/reference"

  def _save_reference(self) -> None:
    ckpt_lib.save_tree(self._reference_dir(), self.reference)  # staged for s3://, az://, ...

  def _restore_reference(self):
    path = self._reference_dir()
    dtype = jnp.dtype(self.config.rl.reference_dtype)
    abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, dtype, sharding=sh),
                            self.state.params, self.shardings.params)
    if not ckpt_lib.tree_exists(path):
      raise FileNotFoundError(f"resuming an RL run with rl.kl_beta > 0 after an SFT warm-up needs the frozen "
                              f"reference saved at RL start, {path}; it is missing (was kl_beta 0 then?)")
    return ckpt_lib.restore_tree(path, abstract)

  def _ensure_reference(self, step: int) -> None:
    """At the SFT -> RL hand-over: the reference is the policy now (saved for resumes)."""
    if self.needs_reference and self.reference is None:
      self.reference = self._reference_copy(self.state.params)
      if step == self.sft_steps and self.sft_steps:
        self._save_reference()

  def _masks(self, step: int, rows: int, n: int, estimator: str):
    # Same key -> same masks for the current and the old policy (drawn once per rollout batch).
    key = jax.random.fold_in(jax.random.fold_in(self.rng, 2), step)
    key = jax.random.fold_in(key, 0)  # (was the process index; 0 keeps one-process runs as they were)
    # drawn for the GLOBAL rows, this host keeps its slice: the same masks on any
    # topology (`rows` is this host's share).
    total = rows * jax.process_count()
    m, w = masking.sample_masks(key, total, self.config.rollout.gen_length, n, estimator=estimator)
    mine = dist.host_slice(total)
    return np.asarray(m)[:, mine], np.asarray(w)[:, mine]

  # ------------------------------------------------------------------ steps

  def sft_step(self, step: int) -> dict:
    c = self.config
    rows = c.sft.batch_size // jax.process_count()
    t0 = time.time()
    tokens, attn = self.task.sft_batch(step, rows, c.rollout.gen_length)
    masks, weights = self._masks(step, tokens.shape[0], c.sft.num_mc_samples, c.sft.mc_estimator)
    batch = {"tokens": tokens, "attention_mask": attn, "advantages": np.zeros(tokens.shape[0], np.float32),
             "mc_masks": masks, "mc_weights": weights}
    batch = mesh_lib.host_batch_to_global(batch, self.mesh, step_lib.BATCH_AXIS)
    compiled, mem = self._compiled("sft", batch)
    self.state, m = compiled(self.state, batch)
    m = jax.device_get(m)
    self._count_nonfinite(step + 1, [m])
    m["time/train_s"] = time.time() - t0
    m["perf/tokens_per_s"] = tokens.size * jax.process_count() / m["time/train_s"]
    m["mem/step_temp_bytes"] = mem.get("temp_bytes", 0)
    return m

  def rl_step(self, step: int) -> dict:
    c, rl = self.config, self.config.rl
    m: dict = {}
    # 1. prompts for this step (this host's share) and G rollouts each.
    prompts = self.task.train_examples(step, rl.prompts_per_step // jax.process_count())
    t0 = time.time()
    rng = jax.random.fold_in(jax.random.fold_in(self.rng, 1), step)
    rollout, rewards, reward_s, correct = tasks_lib.rollout_and_score(
        self.sampler, self.task, self.state.params, prompts, rng, group_size=rl.group_size,
        chunk=c.rollout.batch_size // jax.process_count() if c.rollout.batch_size else 0,
        return_correct=True, metrics=m)
    m["time/rollout_s"] = time.time() - t0 - reward_s
    m["time/reward_s"] = reward_s
    # 2. advantages per prompt group.
    r = np.asarray(rewards, np.float32).reshape(len(prompts.examples), rl.group_size)
    adv = np.asarray(objectives.group_advantages(jnp.asarray(r), normalize_std=rl.advantage_std)).reshape(-1)
    # metrics over the global batch (all hosts' rows): the same value on every host.
    # accuracy = fully correct answers (never a reward >= 1: a format bonus or partial credit is not one).
    r_all, adv_all, len_all, ok_all = dist.allgather_rows(
        (r, adv, np.asarray(rollout.response_lengths), np.asarray(correct, np.float32)))
    m["train/reward_mean"] = float(r_all.mean())
    m["train/reward_std"] = float(r_all.std())
    m["train/accuracy"] = float(ok_all.mean())
    m["train/response_len"] = float(np.mean(len_all))
    m["train/zero_adv_groups"] = float(np.mean(np.all(np.abs(adv_all.reshape(r_all.shape)) < 1e-8, axis=1)))
    # 3. the batch, with MC masks shared by every policy evaluated on it. After its first stop
    # token (EOS / EOT) a response becomes EOS, as LLaDA's SFT data is: decoding and the reward
    # ignore those tokens, so they must not be trained on as sampled.
    t1 = time.time()
    lengths = np.asarray(rollout.response_lengths)
    tokens = fill_after_stop(np.asarray(rollout.tokens, np.int32), rollout.prompt_len, lengths,
                             self.tokenizer.eos_id)
    attn = np.asarray(rollout.attention_mask, np.int32)
    if self._can_skip_groups():
      # the kept groups are chosen on the global advantages (the same on every
      # host), and each host trains an equal contiguous share of the kept rows (rows move between
      # hosts when the live groups are uneven): the batch equals the one-process batch.
      rows_idx, scale = self._nonzero_groups(adv_all, r_all.shape)
      if len(rows_idx) < len(adv_all):
        if jax.process_count() > 1:
          tokens, attn, lengths = dist.allgather_rows((tokens, attn, lengths))
        mine = rows_idx[dist.host_slice(len(rows_idx))]
        tokens, attn, lengths = tokens[mine], attn[mine], lengths[mine]
        adv = adv_all[mine] * scale
      m["train/rows_trained"] = float(len(rows_idx))
    rows = tokens.shape[0]
    batch = {"tokens": tokens, "attention_mask": attn, "advantages": adv.astype(np.float32)}
    updates = self._rl_updates(step, batch, lengths)
    compiled, mem = self._compiled("rl", updates[0])
    sms = []
    for b in updates:
      self.state, sm = compiled(self.state, b)
      sms.append(sm)
    sms = jax.device_get(sms)  # one transfer for the mu updates' metrics
    self._count_nonfinite(step + 1, sms)
    m.update(sms[-1])
    m["time/train_s"] = time.time() - t1
    m["perf/tokens_per_s"] = rows * jax.process_count() * c.rollout.gen_length / max(time.time() - t0, 1e-9)
    m["mem/step_temp_bytes"] = mem.get("temp_bytes", 0)
    m["mem/step_total_bytes"] = mem.get("total_bytes", 0)
    return m

  def _rl_updates(self, step: int, batch: dict, lengths: np.ndarray) -> list[dict]:
    """The global batch of each of the rl.updates_per_batch inner updates: `batch` (host tokens,
    attention mask, advantages) with the objective's fields (objectives.Objective.host_fields),
    then its old terms (mu > 1) and reference terms (kl_beta > 0), stored once per distinct
    fields (ELBO objectives: once per rollout batch on the same masks; diffu_grpo: per update,
    with its fresh prompt-mask seeds), all before the first update."""
    rl = self.config.rl
    obj, mu, rows = objectives.get(rl.objective), rl.updates_per_batch, batch["tokens"].shape[0]
    inputs = objectives.RolloutInputs(
        step=step, rows=rows, gen_length=self.config.rollout.gen_length, updates=mu, lengths=lengths, rl=rl,
        masks=lambda n, estimator: self._masks(step, rows, n, estimator),
        row_seeds=lambda u: self._row_seeds(step, u, rows))
    fields = obj.host_fields(inputs)
    first = fields[0]
    batch = dict(batch, **first)
    if "row_seeds" in first:
      self.last_rl_seeds = [f["row_seeds"] for f in fields]
    self.last_rl_batch = batch  # host arrays of the trained batch (tests, debugging)
    gbatch = mesh_lib.host_batch_to_global(batch, self.mesh, step_lib.BATCH_AXIS)
    done: dict[int, dict] = {}
    updates = []
    for f in fields:
      if id(f) not in done:
        # Only the arrays that differ from the first update's move to the devices again.
        changed = {k: v for k, v in f.items() if v is not first.get(k)}
        moved = mesh_lib.host_batch_to_global(changed, self.mesh, step_lib.BATCH_AXIS) if changed else {}
        b = dict(gbatch, **moved)
        extra = {}
        if mu > 1:
          extra[obj.old_field.name] = self._terms(self.state.params, b)
        if rl.kl_beta > 0:
          extra[obj.ref_field.name] = self._terms(self.reference, b)
        done[id(f)] = dict(b, **extra)
      updates.append(done[id(f)])
    return updates

  def _count_nonfinite(self, step: int, updates: list[dict]) -> None:
    """Counts the updates the step skipped (NaN/Inf loss or gradient norm; metrics of each update,
    on host). Sets train/nonfinite_steps (cumulative: skipped updates since the run started) on
    the last one and notes a stop after optim.max_nonfinite_steps skipped in a row."""
    limit = int(self.config.optim.get("max_nonfinite_steps", 0) or 0)
    for u in updates:
      if float(u.pop("train/update_skipped", 0.0)) > 0:
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        loss = float(u["train/loss"])
        which, value = ("loss", loss) if not np.isfinite(loss) else ("grad_norm", float(u["train/grad_norm"]))
        if limit and self.nonfinite_run >= limit and self.nonfinite_stop is None:
          self.nonfinite_stop = (
              f"stopped at step {step}: train/{which} is {value}; {self.nonfinite_run} updates in a row were "
              f"skipped for a NaN/Inf loss or gradient norm (optim.max_nonfinite_steps={limit}). The params are "
              f"those of the last finite update (latest checkpoint: step {self.ckpt.latest_step()}); look for bad "
              f"data, rewards or weights, and to retry with other settings start a new --workdir with "
              f"--config.init.checkpoint={self.workdir}")
      else:
        self.nonfinite_run = 0
    updates[-1]["train/nonfinite_steps"] = float(self.nonfinite_total)

  def _row_seeds(self, step: int, update: int, rows: int) -> np.ndarray:
    """[rows] uint32 prompt-mask seeds of diffu_grpo: distinct per row, inner update and step.
    Drawn for the global rows (every host trains the same count) and sliced: the same seeds on
    any topology."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(self.rng, 4), step), update)
    seeds = np.asarray(jax.random.bits(key, (rows * jax.process_count(),), jnp.uint32))
    return seeds[dist.host_slice(len(seeds))]

  @staticmethod
  def _agreed(flag: bool) -> bool:
    """True when any host saw the flag, on every host (a signal may reach hosts at different steps;
    all must save at the same step, or they would wait on each other forever)."""
    if jax.process_count() == 1:
      return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))

  def _can_skip_groups(self) -> bool:
    rl = self.config.rl
    # Exact only where the objective is linear in a positive scaling of A and zero at A = 0
    # (no KL term). Several hosts agree on the kept groups (rl_step gathers the advantages).
    return rl.skip_zero_advantage and rl.kl_beta == 0 and objectives.get(rl.objective).exact_group_skipping

  def _nonzero_groups(self, adv: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, float]:
    g = shape[1]
    # Kept rows must split over the devices (and into micro-batches): a multiple of `unit` groups.
    # ... and over the processes (each host takes an equal share).
    split = int(np.lcm(self.dp, jax.process_count()))
    unit = max(1, split // int(np.gcd(split, g)))
    step_rows = self._micro_rows("rl")
    if step_rows:
      unit = max(unit, step_rows // int(np.gcd(step_rows, g)))
    return step_lib.live_group_rows(adv, g, unit)

  def evaluate(self, step: int) -> dict:
    t0 = time.time()
    result = tasks_lib.evaluate(self.eval_sampler, self.task, self.state.params,
                                rng=jax.random.fold_in(jax.random.fold_in(self.rng, 3), step),
                                num_examples=self.config.eval.num_examples,
                                batch_size=self.config.eval.batch_size)
    result["time/eval_s"] = time.time() - t0
    self.last_eval = result
    return result

  def _save(self, step: int, metrics: dict | None = None) -> None:
    host = {"step": step, "seed": int(self.config.seed), "data_position": step,
            "config": json.loads(self.config.to_json_best_effort()), "nonfinite_steps": self.nonfinite_total}
    self.ckpt.save(step, self.state, host, metrics=metrics)

  # ------------------------------------------------------------------ loop

  def run(self, stop_at: int | None = None) -> dict:
    """Trains to config.total_steps (or to `stop_at`, then saves as on preemption)."""
    c = self.config
    self.preempt.install()
    eval_on = c.eval_every > 0
    if self.start_step == 0 and eval_on and c.eval.at_start:
      self.writer.write(0, self.evaluate(0))
      self.first_eval = dict(self.last_eval)
      if not self.sft_steps:
        self.before_rl = dict(self.last_eval)
    progress = Progress(self.total, self.start_step, "sft+rl" if self.sft_steps and self.rl_steps else c.mode,
                        sft_end=self.sft_steps if self.rl_steps else 0)
    step = self.start_step
    try:
      while step < self.total:
        phase = "sft" if step < self.sft_steps else "rl"
        if step == self.sft_steps and self.sft_steps and c.rl.reset_optimizer:
          # A function of the step, so a run resumed at the boundary does the same.
          self.state = self.state.replace(opt_state=optim_lib.reset_moments(self.state.opt_state))
        if phase == "rl":
          self._ensure_reference(step)
        m = self.sft_step(step) if phase == "sft" else self.rl_step(step)
        step += 1
        self.ckpt.poll()  # a failed asynchronous save stops the run now, not one save later
        every = c.sft.eval_every if phase == "sft" and c.sft.eval_every else c.eval_every
        is_eval = eval_on and (step % every == 0 or step == self.total or step == self.sft_steps)
        if is_eval:
          m.update(self.evaluate(step))
          if step == self.sft_steps and self.rl_steps:
            self.before_rl = dict(self.last_eval)
        if step % c.log_every == 0 or is_eval or self.nonfinite_stop:
          row = self.writer.write(step, m)
          info = " ".join(f"{k.split('/')[-1]}={row[k]:.3g}" for k in
                          ("train/loss", "train/reward_mean", "eval/accuracy") if isinstance(row.get(k), float))
          if self.is_main:
            progress.update(step, f"{phase} {info}", phase)
        if self.nonfinite_stop:
          raise NonFiniteError(self.nonfinite_stop)
        stop = self._agreed(self.preempt.requested) or step == stop_at
        if step % c.checkpoint_every == 0 or step == self.total or stop:
          self._save(step, m if is_eval else None)
        if stop:
          logging.warning("stopped at step %d on request; resume by running the same command", step)
          break
    except BaseException:
      # Earlier checkpoints finish writing (a failed last save is only a warning now: the error
      # on its way up says more), and the metric rows written so far stay.
      self.ckpt.close_after_error()
      self.writer.close()
      raise
    self.ckpt.close()
    self.writer.close()
    summary = {"step": step, **self.last_eval}
    if c.plot_at_end and self.is_main and step >= self.total:
      from bgpo_jax.plot import plot_run
      try:
        summary["plot"] = plot_run(self.workdir)
      except ValueError as e:
        logging.warning("no plot: %s", e)
    return summary


def one_line_errors(fn):
  """`fn` with a RunError (a stopped run: non-finite updates, a failed save, a workdir that is a
  file, no checkpoint restores) printed as its one-line message and exit status 1, no traceback."""
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except ckpt_lib.RunError as e:
      print(f"bgpo_jax.main: {e}", file=sys.stderr)
      sys.exit(1)
  return wrapped


def main(argv) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save INFO lines
  config = FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required, e.g. --workdir=/tmp/bgpo_demo")
  try:
    trainer = Trainer(config, FLAGS.workdir)
  except config_lib.ConfigError as e:  # names the key, the value and the fix: no traceback needed
    print(f"bgpo_jax.main: config error: {e}", file=sys.stderr)
    sys.exit(2)
  summary = trainer.run()
  if trainer.is_main:
    first = getattr(trainer, "first_eval", {})
    before_rl = getattr(trainer, "before_rl", {})
    if "eval/accuracy" in before_rl and "eval/accuracy" in summary:
      print(f"held-out accuracy before RL (step {trainer.sft_steps}): {before_rl['eval/accuracy']:.3f} -> "
            f"after RL (step {summary['step']}): {summary['eval/accuracy']:.3f}")
    elif "eval/accuracy" in first and "eval/accuracy" in summary:
      print(f"held-out accuracy: {first['eval/accuracy']:.3f} at step 0 -> {summary['eval/accuracy']:.3f} "
            f"at step {summary['step']}")
    elif "eval/accuracy" in summary:
      print(f"held-out accuracy at step {summary['step']}: {summary['eval/accuracy']:.3f}")
    if "plot" in summary:
      print(f"learning curves: {summary['plot']}")


if __name__ == "__main__":
  define_flags()
  app.run(one_line_errors(main), flags_parser=config_lib.parse_flags)
