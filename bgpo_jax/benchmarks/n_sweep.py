"""Held-out accuracy after RL against the number n of MC ELBO samples: BGPO at each n from one
SFT start, over seeds, beside VRPO-OL at the largest n whose train step fits BGPO's n = 16 memory.

  python -m bgpo_jax.benchmarks.n_sweep --root DIR [--ns 1,2,4,8,16] [--seeds 0,1,2]
      [--rl-steps 6] [--sft-steps 200 | --sft-workdir RUN] [--vrpo-n 0] [--vrpo-seeds 0,1,2]
      [--out FILE] [--png FILE] [-- --config.k=v ...]

The task is sudoku4 (data/procedural.py): four of the demo's 4x4 sudokus (1-2 blanks each) side by
side, a 64-digit answer on a 64-token canvas (the demo's sudoku answer is 16 tokens: too short for
the ELBO's noise to matter), reward = the fraction of blanks solved, accuracy = all four grids
solved. Every run is the trainer's own command, `python -m bgpo_jax.main --config=configs/demo.py` with the
overrides of `TASK_OVERRIDES` (task, lengths, sampler), `RL_OVERRIDES` (the RL phase) and the
run's objective, n and seed, in DIR/runs/<objective>_n<n>_s<seed>:

1. the SFT start: DIR/sft, mode=sft for `--sft-steps` (skipped when `--sft-workdir` is given);
2. the memory match: the train step of BGPO at n = max(ns) and of VRPO-OL at n = 1, 2, 4, ... compiled
   ahead of time on abstract arrays (the trainer's StepConfig, XLA's memory analysis, as
   benchmarks.memory does), VRPO-OL's n = the largest whose total bytes are <= BGPO's;
3. RL from the SFT start (init.checkpoint = DIR/sft, fresh AdamW moments) for `--rl-steps`
   steps at every (n, seed), seed by seed, and VRPO-OL at its matched n for every seed (or those of
   `--vrpo-seeds`: on-policy at n = 1 its gradient is BGPO's at n = 1); the first run of each
   seed also evaluates at step 0 (the SFT start on that seed's test set: the generated test set
   follows config.seed).

A finished run (its metrics hold the last step's evaluation) is reused, so the command resumes.
The table and JSON hold the accuracy and score (fraction of blanks solved) after RL per run, their
mean and standard error over seeds per (objective, n), and the wall time of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from bgpo_jax.benchmarks.common import device_description, print_table, save_figure, write_json
from bgpo_jax.benchmarks.mc_variance import git_commit

CONFIG = "configs/demo.py"
# The long-response task: a 64-token answer canvas in 16-token blocks (one grid each), 4 tokens per
# model call in rollouts and in the greedy evaluation (mostly copied givens; sized for a 2-core CPU). 64 test puzzles (sized for a 2-core CPU shared
# with other jobs): the score, the fraction of 4-8 blanks solved, varies less between puzzles than
# the 0/1 accuracy.
TASK_OVERRIDES = (
    "--config.task.demo_task=sudoku4", "--config.task.max_prompt_tokens=96", "--config.rollout.prompt_buckets=(96,)",
    "--config.rollout.gen_length=64", "--config.rollout.block_length=16", "--config.rollout.steps=16",
    "--config.eval.gen_length=64", "--config.eval.block_length=16", "--config.eval.steps=16",
    "--config.eval.num_examples=64", "--config.eval.batch_size=64", "--config.task.demo_test_size=64",
    "--config.plot_at_end=False",
)
# The RL phase: the demo's optimizer (lr 2e-4, fresh moments), 4 prompts x G = 4 per step (sized for a
# 2-core CPU shared with other jobs), evaluated at the end only (eval_every = the step count, per run).
RL_OVERRIDES = (
    "--config.sft.steps=0", "--config.rl.prompts_per_step=4", "--config.rl.group_size=4",
    "--config.rl.micro_batch_per_device=16", "--config.checkpoint_every=1000",
)


def _run_main(args: list[str], log_path: str) -> float:
  """Runs `python -m bgpo_jax.main ARGS`, its output to log_path; returns the wall seconds."""
  t0 = time.time()
  with open(log_path, "a") as log:
    proc = subprocess.run([sys.executable, "-m", "bgpo_jax.main", *args], stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise RuntimeError(f"bgpo_jax.main {' '.join(args)} failed with exit code {proc.returncode}; see {log_path}")
  return time.time() - t0


def eval_rows(workdir: str) -> dict[int, dict]:
  """{step: the eval/* metrics logged at that step} of a run's metrics.jsonl."""
  out: dict[int, dict] = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      ev = {k: v for k, v in row.items() if k.startswith("eval/")}
      if ev and "eval/accuracy" in ev:
        out[int(row["step"])] = ev
  return out


def sft_start(root: str, sft_steps: int, extra: list[str]) -> str:
  """DIR/sft: the sudoku4 SFT warm-up, trained unless already done."""
  wd = os.path.join(root, "sft")
  if sft_steps not in eval_rows(wd):
    _run_main([f"--config={CONFIG}", f"--workdir={wd}", *TASK_OVERRIDES, "--config.mode=sft",
               f"--config.total_steps={sft_steps}", *extra], os.path.join(root, "sft.log"))
  return wd


def step_memory(objective: str, n: int, extra: list[str]) -> int:
  """Total bytes (XLA's memory analysis) of the trainer's RL train step of the sweep's config for
  `objective` at n, compiled ahead of time on abstract arrays."""
  from bgpo_jax import config as config_lib
  from bgpo_jax.benchmarks import memory
  from bgpo_jax.models import family
  from bgpo_jax.train import mesh as mesh_lib
  from bgpo_jax.train import run as run_lib
  from bgpo_jax.train import state as state_lib
  from bgpo_jax.train import step as step_lib
  config = memory.load_config_file(CONFIG, [*TASK_OVERRIDES, *RL_OVERRIDES, f"--config.rl.objective={objective}",
                                            f"--config.rl.num_mc_samples={n}", "--config.model.remat_policy=auto",
                                            *extra])
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  dp = mesh_lib.data_parallel_size(mesh)
  m = config.model
  # The preset with the config's architecture keys, as tasks.build_model makes a random-init model.
  arch = {k: m[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size") if m[k] is not None}
  if "n_heads" in arch and "n_kv_heads" not in arch:
    arch["n_kv_heads"] = arch["n_heads"]
  model_cfg = family.preset(m.family, m.preset, param_dtype=m.param_dtype, compute_dtype=m.compute_dtype,
                            remat_policy=config_lib.resolved_remat_policy(config), scan_unroll=m.scan_unroll,
                            logits_chunk=m.logits_chunk, **arch)
  phases = run_lib.Phases.of(config)
  optimizer, schedule = run_lib.make_optimizer(config, phases)
  abstract, shardings = state_lib.abstract_train_state(model_cfg, optimizer, mesh)
  scfg = run_lib.step_config(config, "rl", dp)
  rows = config.rl.prompts_per_step * config.rl.group_size
  batch = memory.config_batch(config, mesh, scfg, rows=rows, prompt_len=memory.plan_prompt_len(config))
  fn = step_lib.jit_train_step(model_cfg, scfg, optimizer, schedule, mesh, shardings, batch)
  return int(step_lib.memory_report(fn.lower(abstract, batch).compile())["total_bytes"])


def matched_vrpo_n(bgpo_n: int, extra: list[str], max_n: int = 64) -> tuple[int, dict]:
  """The largest n (a power of two) whose VRPO-OL train step needs at most the bytes of BGPO's at
  bgpo_n; (n, {"bgpo_n<k>": bytes, "vrpo_ol_n<k>": bytes, ...})."""
  budget = step_memory("bgpo", bgpo_n, extra)
  table = {f"bgpo_n{bgpo_n}": budget}
  best, n = 0, 1
  while n <= max_n:
    b = step_memory("vrpo_ol", n, extra)
    table[f"vrpo_ol_n{n}"] = b
    if b > budget:
      break
    best, n = n, n * 2
  if not best:
    raise RuntimeError(f"VRPO-OL at n=1 needs {table['vrpo_ol_n1']} bytes, more than BGPO's {budget} at n={bgpo_n}")
  return best, table


def rl_run(root: str, sft: str, objective: str, n: int, seed: int, steps: int, extra: list[str],
           at_start: bool) -> dict:
  """One RL run (reused when finished): its evaluations before (at_start) and after RL, wall time."""
  name = f"{objective}_n{n}_s{seed}"
  wd = os.path.join(root, "runs", name)
  evals = eval_rows(wd)
  wall = None
  if steps not in evals:
    wall = _run_main([f"--config={CONFIG}", f"--workdir={wd}", *TASK_OVERRIDES, *RL_OVERRIDES,
                      f"--config.init.checkpoint={sft}", f"--config.rl.objective={objective}",
                      f"--config.rl.num_mc_samples={n}", f"--config.seed={seed}", f"--config.total_steps={steps}",
                      f"--config.eval_every={steps}", f"--config.eval.at_start={at_start}",
                      "--config.model.remat_policy=auto", *extra],
                     os.path.join(root, "runs", name + ".log"))
    evals = eval_rows(wd)
    with open(os.path.join(wd, "sweep_wall_s.txt"), "w") as f:
      f.write(f"{wall:.1f}\n")
  elif os.path.exists(os.path.join(wd, "sweep_wall_s.txt")):
    wall = float(open(os.path.join(wd, "sweep_wall_s.txt")).read())
  after = evals[steps]
  r = {"objective": objective, "n": n, "seed": seed, "steps": steps, "accuracy": after["eval/accuracy"],
       "score": after["eval/score_mean"], "wall_s": wall, "workdir": wd}
  if 0 in evals:
    r["accuracy_sft"], r["score_sft"] = evals[0]["eval/accuracy"], evals[0]["eval/score_mean"]
  return r


def plan_runs(ns, seeds, vrpo_n: int, vrpo_seeds=None) -> list[tuple[str, int, int]]:
  """(objective, n, seed) of every RL run, seed by seed, VRPO-OL (vrpo_n > 0) after BGPO's n: a sweep
  stopped early still has whole seeds to compare. vrpo_seeds: the seeds VRPO-OL runs on (None: all)."""
  vrpo_seeds = seeds if vrpo_seeds is None else vrpo_seeds
  return [(obj, n, s) for s in seeds
          for obj, n in [("bgpo", n) for n in ns] + ([("vrpo_ol", vrpo_n)] if vrpo_n > 0 and s in vrpo_seeds else [])]


def summarize(runs: list[dict]) -> list[dict]:
  """Per (objective, n): mean and standard error over seeds of accuracy and score after RL."""
  out = []
  for key in sorted({(r["objective"], r["n"]) for r in runs}, key=lambda k: (k[0] != "bgpo", k[1])):
    rs = [r for r in runs if (r["objective"], r["n"]) == key]
    row = {"objective": key[0], "n": key[1], "seeds": len(rs)}
    for m in ("accuracy", "score"):
      v = np.asarray([r[m] for r in rs], np.float64)
      row[f"{m}_mean"] = float(v.mean())
      row[f"{m}_sem"] = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    out.append(row)
  return out


def plot(summary: list[dict], runs: list[dict], path: str, title: str = "") -> str:
  """Accuracy and score after RL against n (mean +- standard error over seeds, seeds as dots);
  the SFT start as a band, VRPO-OL as its own marker."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, m in zip(axes, ("accuracy", "score")):
    for obj, style in (("bgpo", "o-"), ("vrpo_ol", "s")):
      rows = [s for s in summary if s["objective"] == obj]
      if not rows:
        continue
      ax.errorbar([s["n"] for s in rows], [s[f"{m}_mean"] for s in rows], yerr=[s[f"{m}_sem"] for s in rows],
                  fmt=style, capsize=4, label=f"{obj} (mean +- s.e., {rows[0]['seeds']} seeds)")
      pts = [r for r in runs if r["objective"] == obj]
      ax.plot([r["n"] * (1.06 if obj == "vrpo_ol" else 0.94) for r in pts], [r[m] for r in pts], ".", alpha=0.4,
              color="C0" if obj == "bgpo" else "C1")
    sft = [r[f"{m}_sft"] for r in runs if f"{m}_sft" in r]
    if sft:
      ax.axhline(float(np.mean(sft)), color="gray", ls="--", lw=1, label=f"SFT start (mean of {len(sft)} seeds)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n (MC samples)")
    ax.set_ylabel(f"held-out {m} after RL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return save_figure(fig, path, title)


def _ints(s: str) -> tuple[int, ...]:
  return tuple(int(x) for x in s.split(",") if x)


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--root", required=True, help="directory of the SFT start, the runs and their logs")
  ap.add_argument("--ns", type=_ints, default=(1, 2, 4, 8, 16))
  ap.add_argument("--seeds", type=_ints, default=(0, 1, 2))
  ap.add_argument("--rl-steps", type=int, default=6)
  ap.add_argument("--sft-steps", type=int, default=200)
  ap.add_argument("--sft-workdir", default="", help="an existing SFT start (a trainer run) instead of DIR/sft")
  ap.add_argument("--vrpo-n", type=int, default=0, help="VRPO-OL's n; 0 = the memory match; -1 = no VRPO-OL runs")
  ap.add_argument("--vrpo-seeds", type=_ints, default=None,
                  help="the seeds VRPO-OL runs on (default: every seed); at n = 1 on-policy it repeats BGPO n = 1")
  ap.add_argument("--out", default=None)
  ap.add_argument("--png", default=None)
  ap.add_argument("overrides", nargs="*", help="--config.k=v overrides for every run (after --)")
  return ap.parse_args(argv)


def main(argv=None) -> dict:
  a = parse_args(argv)
  t0 = time.time()
  commit = git_commit()  # the code that runs (HEAD may move while it does)
  os.makedirs(os.path.join(a.root, "runs"), exist_ok=True)
  # One compilation cache for every run of the sweep: the sampler's programs compile once.
  extra = [f"--config.compilation_cache_dir={os.path.join(os.path.abspath(a.root), 'jax_cache')}", *a.overrides]
  sft = a.sft_workdir or sft_start(a.root, a.sft_steps, extra)
  memory = {}
  vrpo_n = a.vrpo_n
  if vrpo_n == 0:
    vrpo_n, memory = matched_vrpo_n(max(a.ns), extra)
    print(f"memory: {memory}; VRPO-OL n = {vrpo_n}", flush=True)
  plan = plan_runs(a.ns, a.seeds, vrpo_n, a.vrpo_seeds)
  runs = []
  for obj, n, s in plan:
    first = obj == "bgpo" and n == a.ns[0]
    r = rl_run(a.root, sft, obj, n, s, a.rl_steps, extra, at_start=first)
    runs.append(r)
    print(json.dumps({k: v for k, v in r.items() if k != "workdir"}), flush=True)
  summary = summarize(runs)
  wall = time.time() - t0
  meta = {"commit": commit, "device": device_description(), "sft": sft, "rl_steps": a.rl_steps,
          "ns": list(a.ns), "seeds": list(a.seeds), "vrpo_ol_n": vrpo_n, "memory_bytes": memory,
          "task_overrides": list(TASK_OVERRIDES), "rl_overrides": list(RL_OVERRIDES), "overrides": extra,
          "wall_s": wall, "runs_wall_s": float(sum(r["wall_s"] or 0.0 for r in runs))}
  print_table(runs, ["objective", "n", "seed", "accuracy_sft", "score_sft", "accuracy", "score", "wall_s"],
              title="runs")
  print_table(summary, ["objective", "n", "seeds", "accuracy_mean", "accuracy_sem", "score_mean", "score_sem"],
              title=f"after {a.rl_steps} RL steps (sudoku4, 64-token responses); commit {meta['commit']}; "
                    f"{device_description()}; wall {wall:.0f} s")
  write_json(a.out, {"runs": runs, "summary": summary}, meta=meta)
  if a.png:
    plot(summary, runs, a.png, title=f"sudoku4, {a.rl_steps} RL steps from one SFT start; VRPO-OL at n={vrpo_n} "
                                     f"(memory of BGPO n={max(a.ns)}); commit {meta['commit']}")
  return {"runs": runs, "summary": summary, "meta": meta}


if __name__ == "__main__":
  main()
