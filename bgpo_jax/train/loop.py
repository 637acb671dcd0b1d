"""The training loop: SFT steps, then RL steps, over a built run (train/run.py).

One RL step, top to bottom in `rl_step`: prompts (data) -> rollouts (G per prompt, diffusion
sampler on the mesh) -> rewards (the sandbox pool scores chunk k while the device generates chunk
k+1) -> the RL batch (group advantages, responses cut after their stop token, live groups;
train/rl_batch.py) -> the objective's fields (shared MC masks) -> old / reference terms -> the
train step(s) -> metrics. Around the steps (`train`): evaluation on the test split (also at step
0), checkpoints every `checkpoint_every` steps, SIGTERM / SIGINT -> finish the step, save, stop.
"""

from __future__ import annotations

import json
import logging
import time

import jax
import numpy as np

from bgpo_jax import objectives
from bgpo_jax import tasks as tasks_lib
from bgpo_jax.train import console
from bgpo_jax.train import mesh as mesh_lib
from bgpo_jax.train import optimizer as optim_lib
from bgpo_jax.train import rl_batch as rl_batch_lib
from bgpo_jax.train import rng as rng_lib
from bgpo_jax.train import step as step_lib
from bgpo_jax.train.run import Run, micro_rows


def _to_global(run: Run, batch: dict) -> dict:
  return mesh_lib.host_batch_to_global(batch, run.mesh, step_lib.BATCH_AXIS)


def _apply(run: Run, step: int, phase: str, updates: list[dict]) -> tuple[list[dict], dict]:
  """Runs the compiled `phase` step on each global batch of `updates`; (each update's metrics on
  host, the step's memory report). Skipped (non-finite) updates are counted."""
  compiled, mem = run.steps.train_step(phase, run.state, updates[0])
  metrics = []
  for b in updates:
    run.state, m = compiled(run.state, b)
    metrics.append(m)
  metrics = jax.device_get(metrics)  # one transfer for the updates' metrics
  run.nonfinite.count(step + 1, metrics, run.ckpt.latest_step)
  return metrics, mem


def sft_step(run: Run, step: int) -> dict:
  """One masked-diffusion SFT update on the task's SFT targets."""
  c = run.config
  t0 = time.time()
  tokens, attn = run.task.sft_batch(step, c.sft.batch_size // jax.process_count(), c.rollout.gen_length)
  masks, weights = rng_lib.mc_masks(run.rng, step, tokens.shape[0], c.sft.num_mc_samples, c.sft.mc_estimator,
                                    c.rollout.gen_length)
  batch = {"tokens": tokens, "attention_mask": attn, "advantages": np.zeros(tokens.shape[0], np.float32),
           "mc_masks": masks, "mc_weights": weights, **_dropout_seeds(run, step, 0, tokens.shape[0])}
  (m,), mem = _apply(run, step, "sft", [_to_global(run, batch)])
  m["time/train_s"] = time.time() - t0
  m["perf/tokens_per_s"] = tokens.size * jax.process_count() / m["time/train_s"]
  m["mem/step_temp_bytes"] = mem.get("temp_bytes", 0)
  return m


def rl_step(run: Run, step: int) -> dict:
  """One RL step: rollouts of this step's prompts, their rewards, rl.updates_per_batch updates."""
  c, rl = run.config, run.config.rl
  m: dict = {}
  prompts = run.task.train_examples(step, rl.prompts_per_step // jax.process_count())
  t0 = time.time()
  rollout, rewards, reward_s, correct = tasks_lib.rollout_and_score(
      run.sampler, run.task, run.sampling_params(), prompts, run.rng.key("rollout", step), group_size=rl.group_size,
      chunk=c.rollout.batch_size // jax.process_count() if c.rollout.batch_size else 0,
      return_correct=True, metrics=m)
  m["time/rollout_s"] = time.time() - t0 - reward_s
  m["time/reward_s"] = reward_s
  t1 = time.time()
  batch, lengths, batch_metrics = rl_batch_lib.make_rl_batch(
      rollout.tokens, rollout.attention_mask, rollout.prompt_len, rollout.response_lengths, rewards, correct,
      eos_id=run.tokenizer.eos_id, **rl_batch_settings(c, run.data_parallel))
  m.update(batch_metrics)
  sms, mem = _apply(run, step, "rl", rl_updates(run, step, batch, lengths))
  m.update(sms[-1])
  m["time/train_s"] = time.time() - t1
  m["perf/tokens_per_s"] = batch["tokens"].shape[0] * jax.process_count() * c.rollout.gen_length / max(time.time() - t0, 1e-9)
  m["mem/step_temp_bytes"] = mem.get("temp_bytes", 0)
  m["mem/step_total_bytes"] = mem.get("total_bytes", 0)
  return m


def rl_batch_settings(config, data_parallel: int) -> dict:
  """`make_rl_batch`'s settings from config.rl: group size, advantage normalization, and live
  groups only (rl.skip_zero_advantage) where that leaves the update exact (no KL term, an
  objective linear in A)."""
  rl = config.rl
  skip = rl.skip_zero_advantage and rl.kl_beta == 0 and objectives.get(rl.objective).exact_group_skipping
  unit = rl_batch_lib.live_group_unit(rl.group_size, data_parallel, jax.process_count(),
                                      micro_rows(config, "rl", data_parallel)) if skip else None
  return dict(group_size=rl.group_size, advantage_std=rl.advantage_std,
              leave_one_out=rl.advantage_baseline == "leave_one_out", live_unit=unit)


def rl_updates(run: Run, step: int, batch: dict, lengths: np.ndarray) -> list[dict]:
  """The global batch of each of the rl.updates_per_batch inner updates: `batch` (host tokens,
  attention mask, advantages) with the objective's fields (objectives.Objective.host_fields),
  then its old terms (mu > 1) and reference terms (kl_beta > 0), computed once per distinct
  fields (ELBO objectives: once per rollout batch on the same masks; diffu_grpo: per update, with
  its fresh prompt-mask seeds), all before the first update."""
  rl, gen_length = run.config.rl, run.config.rollout.gen_length
  obj, mu, rows = objectives.get(rl.objective), rl.updates_per_batch, batch["tokens"].shape[0]
  inputs = objectives.RolloutInputs(
      step=step, rows=rows, gen_length=gen_length, updates=mu, lengths=lengths, rl=rl,
      advantages=batch["advantages"],
      masks=lambda n, estimator: rng_lib.mc_masks(run.rng, step, rows, n, estimator, gen_length),
      row_seeds=lambda u: rng_lib.prompt_mask_seeds(run.rng, step, u, rows))
  fields = obj.host_fields(inputs)
  first = fields[0]
  gbatch = _to_global(run, dict(batch, **first))
  done: dict[int, dict] = {}
  for f in fields:
    if id(f) not in done:
      # Only the arrays that differ from the first update's move to the devices again.
      changed = {k: v for k, v in f.items() if v is not first.get(k)}
      b = dict(gbatch, **(_to_global(run, changed) if changed else {}))
      if mu > 1 and obj.old_field is not None:  # a ratio-free objective (wd1) stores none
        b[obj.old_field.name] = run.steps.terms(run.policy(), b)
      if rl.kl_beta > 0:
        b[obj.ref_field.name] = run.steps.terms(run.reference.params, b)
      done[id(f)] = b
  out = [done[id(f)] for f in fields]
  # Dropout masks are fresh every inner update (after the old / reference terms: those run without).
  return [dict(b, **_to_global(run, seeds)) if (seeds := _dropout_seeds(run, step, u, rows)) else b
          for u, b in enumerate(out)]


def _dropout_seeds(run: Run, step: int, update: int, rows: int) -> dict:
  """{step.DROPOUT_SEEDS: [rows] uint32} for a LoRA run with lora.dropout > 0, else {}."""
  if run.lora is None or run.config.lora.dropout <= 0:
    return {}
  return {step_lib.DROPOUT_SEEDS: rng_lib.lora_dropout_seeds(run.rng, step, update, rows)}


def evaluate(run: Run, step: int) -> dict:
  """Held-out accuracy per eval set (config.eval) of the current policy."""
  t0 = time.time()
  result = tasks_lib.evaluate(run.eval_sampler, run.task, run.sampling_params(), rng=run.rng.key("eval", step),
                              num_examples=run.config.eval.num_examples, batch_size=run.config.eval.batch_size)
  result["time/eval_s"] = time.time() - t0
  run.last_eval = result
  return result


def save(run: Run, step: int, metrics: dict | None = None) -> None:
  host = {"step": step, "seed": int(run.config.seed), "data_position": step,
          "config": json.loads(run.config.to_json_best_effort()), "nonfinite_steps": run.nonfinite.total}
  if run.lora is not None:  # the base the adapters were trained on: a resume must have the same
    host["lora_base"] = run.lora.record()
  run.ckpt.save(step, run.state, host, metrics=metrics)


def before_step(run: Run, step: int) -> None:
  """At the SFT -> RL hand-over: fresh AdamW moments (rl.reset_optimizer); before each RL step:
  the KL reference made (the policy at the hand-over) when the run has one. Functions of the
  step, so a run resumed at the boundary does the same."""
  phases = run.phases
  if step == phases.sft_steps and phases.sft_steps and run.config.rl.reset_optimizer:
    run.state = run.state.replace(opt_state=optim_lib.reset_moments(run.state.opt_state))
  if phases.phase(step) == "rl":
    run.reference.at_rl_step(step, phases.sft_steps, run.state.params)


def _log(run: Run, step: int, m: dict, phase: str, progress: console.Progress, show: bool) -> None:
  """Writes the metrics row of a logged (`show`) step; every step's time feeds the progress ETA."""
  row = run.writer.write(step, m) if show else m
  if run.is_main:
    progress.update(step, phase, row, show=show)


def train(run: Run, stop_at: int | None = None) -> dict:
  """Trains to config.total_steps (or to `stop_at`, then saves as on preemption). Returns the
  last evaluation with "step", and "first_eval" / "before_rl" (the evaluations at step 0 and at
  the start of RL, when made)."""
  c, phases, summary = run.config, run.phases, {}
  preempt = console.Preemption()
  preempt.install()
  eval_on = c.eval_every > 0
  if run.start_step == 0 and eval_on and c.eval.at_start:
    run.writer.write(0, evaluate(run, 0))
    summary["first_eval"] = dict(run.last_eval)
    if not phases.sft_steps:
      summary["before_rl"] = dict(run.last_eval)
  label = "sft+rl" if phases.sft_steps and phases.rl_steps else c.mode
  progress = console.Progress(phases.total, run.start_step, label, sft_end=phases.sft_steps if phases.rl_steps else 0,
                              eval_every=(c.sft.eval_every or c.eval_every, c.eval_every) if eval_on else (0, 0))
  step = run.start_step
  try:
    while step < phases.total:
      phase = phases.phase(step)
      before_step(run, step)
      m = sft_step(run, step) if phase == "sft" else rl_step(run, step)
      step += 1
      run.ckpt.poll()  # a failed asynchronous save stops the run now, not one save later
      every = c.sft.eval_every if phase == "sft" and c.sft.eval_every else c.eval_every
      is_eval = eval_on and (step % every == 0 or step == phases.total or step == phases.sft_steps)
      if is_eval:
        m.update(evaluate(run, step))
        if step == phases.sft_steps and phases.rl_steps:
          summary["before_rl"] = dict(run.last_eval)
      _log(run, step, m, phase, progress, show=step % c.log_every == 0 or is_eval or run.nonfinite.stop)
      run.nonfinite.raise_if_stopped()
      stop = preempt.agreed() or step == stop_at
      if step % c.checkpoint_every == 0 or step == phases.total or stop:
        save(run, step, m if is_eval else None)
      if stop:
        logging.warning("stopped at step %d on request; resume by running the same command", step)
        break
  except BaseException:
    # Earlier checkpoints finish writing (a failed last save is only a warning now: the error on
    # its way up says more), and the metric rows written so far stay.
    run.ckpt.close_after_error()
    run.writer.close()
    raise
  run.ckpt.close()
  run.writer.close()
  summary.update(step=step, **run.last_eval)
  if c.plot_at_end and run.is_main and step >= phases.total:
    from bgpo_jax import plot as plot_lib
    try:
      title = plot_lib.config_title(c, plot_lib.command_line_config_name())
      summary["plot"] = plot_lib.plot_run(run.workdir, title=title, sft_steps=phases.sft_steps,
                                          total_steps=phases.total)
    except ValueError as e:
      logging.warning("no plot: %s", e)
  return summary
