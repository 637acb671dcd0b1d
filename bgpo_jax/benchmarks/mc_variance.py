"""The gradient's noise and bias against the number n of Monte Carlo ELBO samples, from a fixed
policy and a fixed rollout batch (BGPO's reason to exist: n can grow at constant memory).

  python -m bgpo_jax.benchmarks.mc_variance [--workdir RUN | --checkpoint HF_DIR] [--out FILE]
      [--png FILE] [--ns 1,2,4,8,16,32] [--ref-n 256] [--draws 16] [--ref-draws 4]
      [--variants bgpo,bgpo@continuous,espo,espo:bound] [--offpolicy bgpo,vrpo_ol]

The policy: `--workdir` of a trainer run (its latest checkpoint), `--checkpoint` a Hugging Face
directory, or by default the demo's SFT warm-up (configs/demo.py, mode=sft, 300 steps), trained
once into `--cache` (a few minutes on a CPU) and reused. The config (`--config`, default
configs/demo.py, `--config.k=v` overrides after `--`) gives the task, the sampler and the
objectives' settings; the benchmark builds the trainer's own run from it (train/run.py), draws ONE
rollout batch the way an RL step does (its prompts for step `--step`, G responses each, rewards,
group advantages, only the groups with a non-zero advantage: the rows a step trains on) and keeps
it fixed.

Then, for each variant and each n, `--draws` independent draws of the objective's MC fields
(`Objective.host_fields` with the run's own mask streams, one draw per index: the masks of
rl.mc_estimator for bgpo / vrpo_ol, ESPO's and SPG's per-row mask seeds) go through the train
step's gradient path (`train.step.accumulate_gradients`, jitted): the objective value and the
gradient of the batch-mean objective, flattened. Reported per n:

- grad_rel_std = sqrt(E||g - mean_n||^2) / ||ref||: the gradient's noise, relative to the size of
  the reference mean gradient `ref` (the mean of `--ref-draws` draws at n = `--ref-n`);
- grad_bias = ||mean_n - ref|| / ||ref||, and grad_bias_floor, what that norm measures for an
  UNBIASED estimator with these draw counts (sqrt(trVar_n / draws + trVar_ref / ref_draws) /
  ||ref||): a bias is resolved only where grad_bias clearly exceeds its floor;
- value_mean, value_rel_std, value_bias (and its floor): the same for the objective value, which
  on-policy is mean(A) whatever the masks (every d_j = 0), so values are reported off-policy only;
- per variant: slope, the least-squares slope of log grad_rel_std against log n (-0.5 for n
  independent samples; a stratified draw can fall faster).

Variants: an objective name, `@continuous` / `@stratified` to pick rl.mc_estimator, and `:k=v`
hyper-parameters of the objective's config section (as memory.py's specs; `:bound` = bound=True).
On-policy (theta = theta_old, one update per rollout batch, the paper's setting) VRPO-OL's gradient
equals BGPO's for the same masks exactly (SPEC section 3; tests/benchmarks check it), so VRPO-OL
appears only off-policy. `--offpolicy` variants are measured at theta = theta_old after
`--offpolicy-updates` AdamW steps of BGPO on the batch (lr `--offpolicy-lr`), with the old terms
stored by the trainer's own no-gradient pass (`compute_old_terms`) on each draw's masks: there the
objective is non-linear in d (VRPO-OL's exp(mean d)) and its value and gradient can be biased in n.
SPG picks one block per sample, so its n is at most gen_length / rl.spg.block_length (16 on the
demo with block_length 1) and it has no n = 256 reference: it is not a default variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from bgpo_jax import objectives
from bgpo_jax.benchmarks.common import device_description, print_table, save_figure, write_json
from bgpo_jax.benchmarks.memory import load_config_file
from bgpo_jax.train import rng as rng_lib
from bgpo_jax.train import step as step_lib

DEFAULT_NS = (1, 2, 4, 8, 16, 32)
DEFAULT_VARIANTS = ("bgpo", "bgpo@continuous", "espo", "espo:bound")
DEFAULT_OFFPOLICY = ("bgpo", "vrpo_ol")
# Mask draws live on their own step indices of the run's "mc_masks" / "prompt_mask_seeds" streams,
# far from any step a demo-sized run trains on (so no draw repeats a training step's masks).
DRAW_BASE = 1_000_000
# Sample-rows one micro-batch of a whole-batch objective (VRPO-OL, ESPO) holds at once: its n
# samples' graphs are all alive, so at n = 256 the rows are split to keep memory bounded.
MAX_SAMPLE_ROWS = 2048


@dataclasses.dataclass(frozen=True)
class Variant:
  """An objective with its estimator and hyper-parameter overrides (`parse_variant`)."""
  spec: str
  objective: str
  estimator: str | None  # rl.mc_estimator override, None = the config's
  hparams: tuple[tuple[str, object], ...]


def _value(s: str):
  for cast in (int, float):
    try:
      return cast(s)
    except ValueError:
      pass
  return {"true": True, "false": False, "none": None}.get(s.lower(), s)


def parse_variant(spec: str) -> Variant:
  """"bgpo", "bgpo@continuous", "espo:bound", "spg:logp_estimation=elbo:block_length=1"."""
  head, *kvs = spec.split(":")
  name, _, est = head.partition("@")
  objectives.get(name)  # an unknown name fails here, listing the registered ones
  if est and est not in ("stratified", "continuous"):
    raise ValueError(f"variant {spec!r}: estimator {est!r} must be stratified or continuous")
  hp = []
  for kv in kvs:
    k, eq, v = kv.partition("=")
    hp.append((k, _value(v) if eq else True))
  return Variant(spec, name, est or None, tuple(hp))


# ------------------------------------------------------------------------------ the policy


def demo_sft_workdir(cache: str, config_path: str = "configs/demo.py") -> str:
  """The demo's SFT warm-up (mode=sft, its sft.* settings) in `cache`/demo_sft, trained by the
  trainer's own command the first time (a few minutes on 2 CPU cores), then reused."""
  wd = os.path.join(cache, "demo_sft")
  config = load_config_file(config_path)
  steps = int(config.sft.steps)
  done = os.path.join(wd, "checkpoints", str(steps))
  if not os.path.isdir(done):
    cmd = [sys.executable, "-m", "bgpo_jax.main", f"--config={config_path}", f"--workdir={wd}",
           "--config.mode=sft", f"--config.total_steps={steps}", "--config.plot_at_end=False"]
    print("training the policy:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
  return wd


def build_run(config_path: str, overrides: list[str], policy: str, workdir: str):
  """The trainer's run (train/run.py) of `config_path` with init.checkpoint = `policy`: RL from
  that policy, no warm-up. `workdir` is a scratch directory (the run records its config there)."""
  from bgpo_jax.train import run as run_lib
  config = load_config_file(config_path, [*overrides, f"--config.init.checkpoint={policy}", "--config.sft.steps=0",
                                          "--config.mode=rl"])
  return run_lib.build_run(config, workdir)


def rollout_batch(run, step: int) -> tuple[dict, np.ndarray, dict]:
  """One RL step's training batch, as loop.rl_step makes it: the prompts of `step`, G rollouts
  each, their rewards, group advantages and only the live groups (rl.skip_zero_advantage).
  Returns (host batch {tokens, attention_mask, advantages}, lengths [rows], metrics)."""
  from bgpo_jax import tasks as tasks_lib
  from bgpo_jax.train import loop
  c, rl = run.config, run.config.rl
  prompts = run.task.train_examples(step, rl.prompts_per_step)
  rollout, rewards, _, correct = tasks_lib.rollout_and_score(
      run.sampler, run.task, run.sampling_params(), prompts, run.rng.key("rollout", step), group_size=rl.group_size,
      return_correct=True)
  from bgpo_jax.train import rl_batch as rl_batch_lib
  batch, lengths, m = rl_batch_lib.make_rl_batch(
      rollout.tokens, rollout.attention_mask, rollout.prompt_len, rollout.response_lengths, rewards, correct,
      eos_id=run.tokenizer.eos_id, **loop.rl_batch_settings(c, run.data_parallel))
  return batch, lengths, m


# ------------------------------------------------------------------------------ the measurement


def variant_config(run, variant: Variant, n: int):
  """A copy of the run's config with the variant's objective, estimator, hyper-parameters and n."""
  config = run.config.copy_and_resolve_references()
  with config.unlocked():
    config.rl.objective = variant.objective
    config.rl.num_mc_samples = n
    if variant.estimator:
      config.rl.mc_estimator = variant.estimator
    section = config.rl[variant.objective] if variant.objective in config.rl else config.rl
    for k, v in variant.hparams:
      if k not in section:
        raise ValueError(f"variant {variant.spec!r}: {k!r} is not a hyper-parameter of {variant.objective} "
                         f"(its keys: {sorted(section.keys())})")
      section[k] = v
  return config


def step_config(run, variant: Variant, n: int, rows: int, *, off_policy: bool) -> step_lib.StepConfig:
  """The trainer's RL StepConfig for this variant at n samples (run.step_config of its config), on
  `rows` rows: the whole batch in one micro-batch, or for an objective that holds all n samples'
  graphs at once (VRPO-OL, ESPO), micro-batches of at most MAX_SAMPLE_ROWS sample-rows."""
  from bgpo_jax.train import run as run_lib
  scfg = run_lib.step_config(variant_config(run, variant, n), "rl", run.data_parallel)
  units_at_once = 1 if scfg.impl.units(scfg) > 1 else n
  micro = rows
  while micro > 1 and micro * units_at_once > MAX_SAMPLE_ROWS and micro % 2 == 0:
    micro //= 2
  return dataclasses.replace(scfg, micro_batch_size=micro, off_policy=off_policy, kl_beta=0.0)


def draw_fields(run, variant: Variant, n: int, draw: int, batch: dict, lengths: np.ndarray) -> dict:
  """The objective's MC fields (Objective.host_fields) of draw `draw`: its own step index of the
  run's mask streams, so different draws are independent and the same draw is the same masks."""
  rl = variant_config(run, variant, n).rl
  rows, L = batch["tokens"].shape[0], run.config.rollout.gen_length
  step = DRAW_BASE + draw
  inputs = objectives.RolloutInputs(
      step=step, rows=rows, gen_length=L, updates=1, lengths=lengths, rl=rl, advantages=batch["advantages"],
      masks=lambda k, est: rng_lib.mc_masks(run.rng, step, rows, k, est, L),
      row_seeds=lambda u: rng_lib.prompt_mask_seeds(run.rng, step, u, rows))
  return objectives.get(variant.objective).host_fields(inputs)[0]


@functools.lru_cache(maxsize=None)
def _grad_program(model_cfg, scfg: step_lib.StepConfig):
  """jit of the train step's gradient path: (params, batch) -> (objective, flat float32 grad)."""
  def fn(params, batch):
    obj, grads, _ = step_lib.accumulate_gradients(model_cfg, scfg, params, batch)
    return obj, ravel_pytree(grads)[0]
  return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def _old_program(model_cfg, scfg: step_lib.StepConfig):
  return jax.jit(functools.partial(step_lib.compute_old_terms, model_cfg, scfg))


class Moments:
  """Running mean and total variance of vectors (float64 on the host; Welford's update)."""

  def __init__(self):
    self.count, self.mean, self.m2, self.values = 0, None, 0.0, []

  def add(self, g: np.ndarray, value: float) -> None:
    g = np.asarray(g, np.float64)
    self.count += 1
    if self.mean is None:
      self.mean = np.zeros_like(g)
    delta = g - self.mean
    self.mean += delta / self.count
    self.m2 += float(np.dot(delta, g - self.mean))
    self.values.append(float(value))

  @property
  def trace_var(self) -> float:
    """sum over coordinates of the unbiased variance (0 with one draw)."""
    return self.m2 / (self.count - 1) if self.count > 1 else 0.0


def measure_variant(run, variant: Variant, ns, batch: dict, lengths: np.ndarray, *, draws: int, ref_n: int,
                    ref_draws: int, params, old_params=None, log=print) -> list[dict]:
  """One row per n (and the reference) for `variant`; old_params given = off-policy (the old terms
  of old_params on each draw's masks, the gradient at params)."""
  off = old_params is not None
  rows = batch["tokens"].shape[0]
  moments = {}
  t0 = time.perf_counter()
  for n, k in [(ref_n, ref_draws)] + [(n, draws) for n in ns]:
    scfg = step_config(run, variant, n, rows, off_policy=off)
    grad = _grad_program(run.model_cfg, scfg)
    mom = Moments()
    for d in range(k):
      # Draws of different n use different indices: their masks are independent.
      b = dict(batch, **draw_fields(run, variant, n, d + 1000 * n, batch, lengths))
      b = {key: jnp.asarray(v) for key, v in b.items()}
      if off:
        b[scfg.impl.old_field.name] = _old_program(run.model_cfg, scfg)(old_params, b)
      value, g = grad(params, b)
      mom.add(jax.device_get(g), float(value))
    moments[n] = mom
    log(f"  {variant.spec}{' off-policy' if off else ''} n={n}: {k} draws, {time.perf_counter() - t0:.0f}s")
  ref = moments[ref_n]
  ref_norm = float(np.linalg.norm(ref.mean))
  ref_value = float(np.mean(ref.values))
  ref_value_var = float(np.var(ref.values, ddof=1)) if ref.count > 1 else 0.0
  out = []
  for n in list(ns) + [ref_n]:
    m = moments[n]
    values = np.asarray(m.values)
    value_var = float(np.var(values, ddof=1)) if m.count > 1 else 0.0
    r = {"variant": variant.spec, "objective": variant.objective,
         "estimator": variant.estimator or run.config.rl.mc_estimator, "policy": "off" if off else "on",
         "n": n, "draws": m.count, "reference": n == ref_n,
         "grad_rel_std": float(np.sqrt(m.trace_var) / ref_norm),
         "grad_norm_mean": float(np.linalg.norm(m.mean)), "grad_norm_ref": ref_norm}
    if n != ref_n:
      r["grad_bias"] = float(np.linalg.norm(m.mean - ref.mean) / ref_norm)
      r["grad_bias_floor"] = float(np.sqrt(m.trace_var / m.count + ref.trace_var / ref.count) / ref_norm)
    if off:
      scale = max(abs(ref_value), 1e-12)
      r.update(value_mean=float(values.mean()), value_ref=ref_value,
               value_rel_std=float(np.sqrt(value_var) / scale))
      if n != ref_n:
        r["value_bias"] = float(abs(values.mean() - ref_value) / scale)
        r["value_bias_floor"] = float(np.sqrt(value_var / m.count + ref_value_var / ref.count) / scale)
    out.append(r)
  slope = log_log_slope([r["n"] for r in out if not r["reference"]],
                        [r["grad_rel_std"] for r in out if not r["reference"]])
  for r in out:
    r["slope"] = slope
  return out


def log_log_slope(ns, ys) -> float:
  """Least-squares slope of log y against log n (nan with fewer than two usable points)."""
  pts = [(np.log(n), np.log(y)) for n, y in zip(ns, ys) if y > 0]
  if len(pts) < 2:
    return float("nan")
  x, y = np.asarray(pts).T
  return float(np.polyfit(x, y, 1)[0])


def offpolicy_params(run, batch: dict, lengths: np.ndarray, *, updates: int, lr: float):
  """theta after `updates` AdamW steps (lr) of on-policy BGPO on the batch from theta_old, each on
  its own mask draw: a policy one or a few updates away from the one that drew the rollouts, as in
  an off-policy inner update (rl.updates_per_batch > 1). Returns (params, mean |d_j| there)."""
  variant = parse_variant("bgpo")
  rows = batch["tokens"].shape[0]
  n = int(run.config.rl.num_mc_samples)
  scfg = step_config(run, variant, n, rows, off_policy=False)
  opt = optax.adamw(lr, weight_decay=0.0)
  params = run.state.params
  state = opt.init(params)

  @jax.jit
  def update(params, state, b):
    _, grads, _ = step_lib.accumulate_gradients(run.model_cfg, scfg, params, b)
    upd, state = opt.update(jax.tree.map(jnp.negative, grads), state, params)
    return optax.apply_updates(params, upd), state

  for u in range(updates):
    b = {k: jnp.asarray(v) for k, v in dict(batch, **draw_fields(run, variant, n, -1 - u + DRAW_BASE, batch,
                                                                   lengths)).items()}
    params, state = update(params, state, b)
  b = {k: jnp.asarray(v) for k, v in dict(batch, **draw_fields(run, variant, n, DRAW_BASE - 100, batch, lengths)).items()}
  oscfg = dataclasses.replace(scfg, off_policy=True)
  old = _old_program(run.model_cfg, oscfg)(run.state.params, b)
  new = _old_program(run.model_cfg, oscfg)(params, b)
  abs_d = float(jnp.mean(jnp.abs(new - old)) / run.config.rollout.gen_length)
  return params, abs_d


# ------------------------------------------------------------------------------ output


def plot(records: list[dict], path: str, title: str = "") -> str:
  """grad_rel_std (left) and grad_bias with its floor (right) against n, log-log, per variant."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  keys = sorted({(r["variant"], r["policy"]) for r in records}, key=lambda k: (k[1] != "on", k[0]))
  for i, (v, pol) in enumerate(keys):
    rs = sorted([r for r in records if r["variant"] == v and r["policy"] == pol and not r["reference"]],
                key=lambda r: r["n"])
    ns = [r["n"] for r in rs]
    color = f"C{i}"
    label = f"{v} ({pol}-policy), slope {rs[0]['slope']:.2f}"
    axes[0].plot(ns, [r["grad_rel_std"] for r in rs], "o-", color=color, label=label)
    axes[1].plot(ns, [r["grad_bias"] for r in rs], "o-", color=color, label=f"{v} ({pol}-policy)")
    axes[1].plot(ns, [r["grad_bias_floor"] for r in rs], ":", color=color)
  if keys:
    n0 = min(r["n"] for r in records)
    r0 = [r for r in records if r["n"] == n0 and r["policy"] == keys[0][1] and r["variant"] == keys[0][0]][0]
    ns = sorted({r["n"] for r in records if not r["reference"]})
    axes[0].plot(ns, [r0["grad_rel_std"] * (x / n0) ** -0.5 for x in ns], "k--", lw=0.8, label="n^-1/2")
  for ax, t in zip(axes, ("gradient relative std", "gradient bias vs n=ref (dotted: unbiased floor)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n (MC samples)")
    ax.set_title(t, fontsize=10)
    ax.grid(alpha=0.3, which="both")
  axes[0].legend(fontsize=7)
  return save_figure(fig, path, title)


COLUMNS = ["variant", "policy", "n", "draws", "grad_rel_std", "grad_bias", "grad_bias_floor", "value_rel_std",
           "value_bias", "value_bias_floor", "slope"]


def git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
  except OSError:
    return "unknown"


def _ints(s: str) -> tuple[int, ...]:
  return tuple(int(x) for x in s.split(",") if x)


def _names(s: str) -> tuple[str, ...]:
  return tuple(x for x in s.split(",") if x)


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/demo.py", help="config file of the task, sampler and objectives")
  ap.add_argument("--workdir", default="", help="a trainer run whose latest checkpoint is the policy")
  ap.add_argument("--checkpoint", default="", help="a Hugging Face directory as the policy")
  ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "bgpo_jax", "mc_variance"),
                  help="where the default policy (the demo's SFT warm-up) is trained once")
  ap.add_argument("--ns", type=_ints, default=DEFAULT_NS)
  ap.add_argument("--ref-n", type=int, default=256)
  ap.add_argument("--draws", type=int, default=16, help="independent mask draws per n")
  ap.add_argument("--ref-draws", type=int, default=4, help="draws at --ref-n")
  ap.add_argument("--variants", type=_names, default=DEFAULT_VARIANTS, help="on-policy variants")
  ap.add_argument("--offpolicy", type=_names, default=DEFAULT_OFFPOLICY, help="off-policy variants ('' = none)")
  ap.add_argument("--offpolicy-updates", type=int, default=2)
  ap.add_argument("--offpolicy-lr", type=float, default=2e-4)
  ap.add_argument("--step", type=int, default=0, help="the RL step whose prompts make the rollout batch")
  ap.add_argument("--out", default=None, help="JSON records")
  ap.add_argument("--png", default=None, help="the plot")
  ap.add_argument("overrides", nargs="*", help="--config.k=v overrides (after --)")
  a = ap.parse_args(argv)
  if a.workdir and a.checkpoint:
    ap.error("give --workdir or --checkpoint, not both")
  if a.ref_draws < 2 or a.draws < 2:
    ap.error(f"--draws {a.draws} and --ref-draws {a.ref_draws} must be >= 2 (a variance needs two draws)")
  return a


def main(argv=None) -> list[dict]:
  a = parse_args(argv)
  t_start = time.perf_counter()
  commit = git_commit()  # the code that runs (HEAD may move while it does)
  policy = a.workdir or a.checkpoint or demo_sft_workdir(a.cache, a.config)
  scratch = tempfile.mkdtemp(prefix="bgpo_mc_variance_")
  overrides = [*a.overrides, "--config.compilation_cache_dir=off", "--config.plot_at_end=False"]
  run = build_run(a.config, overrides, policy, scratch)
  batch, lengths, m = rollout_batch(run, a.step)
  rows = batch["tokens"].shape[0]
  if not np.any(batch["advantages"]):
    raise SystemExit(f"the rollout batch of step {a.step} has no group with different rewards (a zero gradient "
                     f"at every n): give a policy that solves some prompts (--workdir / --checkpoint) or another --step")
  print(f"policy {policy}; rollout batch of step {a.step}: {rows} live rows, reward mean "
        f"{m['train/reward_mean']:.3f}, accuracy {m['train/accuracy']:.3f}, gen_length "
        f"{run.config.rollout.gen_length}", flush=True)
  params = run.state.params
  records = []
  for spec in a.variants:
    records += measure_variant(run, parse_variant(spec), a.ns, batch, lengths, draws=a.draws, ref_n=a.ref_n,
                               ref_draws=a.ref_draws, params=params)
  abs_d = None
  if a.offpolicy:
    new_params, abs_d = offpolicy_params(run, batch, lengths, updates=a.offpolicy_updates, lr=a.offpolicy_lr)
    print(f"off-policy: theta after {a.offpolicy_updates} AdamW update(s) at lr {a.offpolicy_lr}: mean |d_j| "
          f"{abs_d:.2e}", flush=True)
    for spec in a.offpolicy:
      records += measure_variant(run, parse_variant(spec), a.ns, batch, lengths, draws=a.draws, ref_n=a.ref_n,
                                 ref_draws=a.ref_draws, params=new_params, old_params=params)
  meta = {"policy": policy, "config": a.config, "overrides": a.overrides, "rows": rows,
          "gen_length": int(run.config.rollout.gen_length), "reward_mean": m["train/reward_mean"],
          "ns": list(a.ns), "ref_n": a.ref_n, "draws": a.draws, "ref_draws": a.ref_draws,
          "offpolicy_updates": a.offpolicy_updates, "offpolicy_lr": a.offpolicy_lr, "offpolicy_abs_d": abs_d,
          "commit": commit, "device": device_description(), "wall_s": time.perf_counter() - t_start}
  report(records, meta, a.out, a.png, title=f"{os.path.basename(os.path.normpath(policy))}: {rows} rows, "
                                           f"L={meta['gen_length']}, ref n={a.ref_n}")
  return records


def report(records: list[dict], meta: dict, out: str | None, png: str | None, title: str = "") -> dict:
  """Prints the table and the slopes, writes the JSON records (meta beside them, with
  meta["slopes"]: variant/policy -> slope) and the plot. Returns meta."""
  meta = dict(meta, slopes={f"{r['variant']}/{r['policy']}": r["slope"] for r in records})
  print_table([r for r in records if not r["reference"]], COLUMNS,
              title=f"gradient noise and bias vs n (reference n={meta['ref_n']}, {meta['ref_draws']} draws); "
                    f"{meta['rows']} rows x {meta['gen_length']} tokens; commit {meta['commit']}; {meta['device']}")
  for k, v in meta["slopes"].items():
    print(f"slope of log grad_rel_std vs log n, {k}: {v:.3f}")
  print(f"wall {meta['wall_s']:.0f} s")
  write_json(out, records, meta=meta)
  if png:
    plot(records, png, title=f"{title}; commit {meta['commit']}")
  return meta

if __name__ == "__main__":
  main()
