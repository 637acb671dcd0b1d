"""Train-step memory and time versus the number of MC samples n: BGPO against VRPO-OL, or any
registered objectives (`--objectives bgpo,vrpo_ol,espo,espo:bound,spg,spg:...`).

  python -m bgpo_jax.benchmarks.memory [--out FILE]          # the default table (~8 min on 2 CPUs)
  python -m bgpo_jax.benchmarks.memory --plan-8b [--out FILE] # LLaDA-8B per-device plan, 8-way FSDP
  python -m bgpo_jax.benchmarks.memory --gpu-fit [--out FILE] # largest n that fits (run on a GPU)

Memory comes from XLA's analysis of the compiled train step (`compiled.memory_analysis()`, see
step_lib.memory_report): the full jitted step (gradient accumulation by scan + AdamW update) is
lowered on abstract arrays (ShapeDtypeStructs with shardings), so nothing big is allocated and a
row costs one compile. temp = XLA's scratch (activations, gradient accumulator, optimizer
temporaries); total = temp + arguments + outputs - donated aliases. On a CPU these numbers are a
proxy for an accelerator's: XLA:CPU fuses and schedules differently, but the scaling in n is the
same program property.

An objective spec is a registered name, optionally with boolean hyper-parameters switched on after
a colon, joined by "+": `espo:bound` is ESPO with rl.espo.bound=True (BGPO's per-sample bound).
`spg:logp_estimation=elbo` sets a field to a value. Each spec's batch is its own layout (objectives.batch_layout), on-policy, without a KL.

Default setting (the training defaults of bgpo_jax.config): model "small" (134M params), float32
master weights, bfloat16 compute, per-block remat "full", 256 prompt + 256 response tokens, a
per-step batch of 8 sequences in micro-batches of 2 rows (4 micro-batches: the scan runs over
micro-batches, then, for BGPO, over the n samples).

Time: a full step of "small" on this CPU costs ~4 s per sequence per MC sample, so the timed rows
use the same step with the "tiny" model (`--time-model`) for the n in `--time-ns` (JSON key
`timed_model`; other rows have step_s null). The steps of one objective are timed round-robin and
each keeps its fastest run (robust to a shared, loaded machine). FLOPs of one MC sample's
forward+backward = 3 * llada.forward_flops(batch, prompt+response) (remat recompute not counted:
model FLOPs); MFU divides by the matmul peak of the compute dtype (benchmarks.common.
matmul_peak_flops: the fastest of 25 runs after 5 warm-ups, since a median taken while other jobs compute
understates the peak). Every timed n keeps its own train state alive while the
objective's steps are timed (tiny: 12 MB each; small: 1.6 GB each).

--plan-8b: ahead-of-time compile of the LLaDA-8B step at 512 + 512 tokens, per-device micro-batch
1, on 8 fake CPU devices (a subprocess with --xla_force_host_platform_device_count=8) with a
(1, 8, 1) mesh (8-way FSDP); per-device argument / output / temp / total vs an H100 (80 GB) and a
TPU v5p chip (95 GB).

--plan-8b --config=configs/math.py [--devices N] [--config.k=v ...]: plans what that task config
(with the trainer's command-line overrides) would run on N
devices (default 8): LLaDA-8B (Dream-7B for model.family=dream, e.g. configs/dream_math.py) with
the config's mesh, precision, remat, rollout batch, n,
micro-batch, prompt bucket and lengths; compiles its train step (built by the trainer's own
train.run.step_config) and its rollout sampler (tasks.build_rollout_sampler) ahead of time on N
fake CPU devices. Records: `config`, `what` (train_step / sampler), `devices`, per-device bytes;
a sampler record's `peak_bytes` adds the optimizer state that stays resident while it runs.
A LoRA config (lora.rank > 0, e.g. `configs/math.py:lora --devices 1`) is planned as the trainer
runs it: the train state over the adapters, the frozen base in lora.base_dtype as an argument of
the step (and resident beside a merged sampler), the reference free from fresh adapters. XLA:CPU
has no bf16 matmul and would hold a float32 copy of every bf16 weight through the program, so bf16
weights are compiled as float32 stand-ins and counted at 2 bytes (`cpu_stand_in`).

--gpu-fit: on an accelerator, the largest n whose step fits in the device memory
(memory_stats()["bytes_limit"] times --fit-headroom) for a ~1B LLaDA (d_model 2048, 16 layers,
16 heads, MLP 5632, LLaDA vocab 126464: 1.34B params, 0.82B without embeddings) at 512 response
tokens; search by doubling then bisection, one compile per probe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bgpo_jax import objectives
from bgpo_jax.benchmarks import common
from bgpo_jax.config import base_config
from bgpo_jax.diffusion import masking
from bgpo_jax.models import family as family_lib
from bgpo_jax.models import llada
from bgpo_jax.train import mesh as mesh_lib
from bgpo_jax.train import optimizer as optim_lib
from bgpo_jax.train import state as state_lib
from bgpo_jax.train import step as step_lib

DEFAULT_NS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_TIME_NS = {"bgpo": (1, 2, 4, 8, 16), "vrpo_ol": (1, 2, 4)}
H100_BYTES = 80e9
TPU_V5P_BYTES = 95e9
PLAN_DEVICES = 8
# (objective, param_dtype, n) compiled by --plan-8b: the default config (float32 master weights)
# at n = 1 and the paper's n = 16, bf16 weights (moments follow), VRPO-OL at the paper's n = 4.
PLAN_VARIANTS = (("bgpo", "float32", 1), ("bgpo", "float32", 16), ("bgpo", "bfloat16", 1),
                 ("bgpo", "bfloat16", 16), ("vrpo_ol", "float32", 4), ("vrpo_ol", "float32", 16))
# ~1B LLaDA for --gpu-fit (LLaDA's vocabulary: the head's logits are a real part of the memory).
GPU_1B = dict(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, mlp_hidden_size=5632)
# --plan-8b --config: the full-size preset planned for config.model.family, and its end-of-turn
# id (the sampler's second stop token: LLaDA's <|eot_id|>, Dream's <|im_end|>).
BIG_PRESETS = {"llada": "llada_8b", "dream": "dream_7b"}
EOT_IDS = {"llada": 126348, "dream": 151645}


def model_config(name: str, *, remat: str = "full", param_dtype: str = "float32",
                 compute_dtype: str = "bfloat16", **overrides) -> llada.LLaDAConfig:
  """A preset ("tiny", "small", "llada_8b") or "gpu_1b" with the precision / remat knobs."""
  knobs = dict(remat_policy=remat, param_dtype=param_dtype, compute_dtype=compute_dtype)
  if name == "gpu_1b":
    return llada.LLaDAConfig.preset("llada_8b", **{**GPU_1B, **knobs, **overrides})
  return llada.LLaDAConfig.preset(name, **knobs, **overrides)


def make_optimizer():
  """The trainer's optimizer (AdamW + global-norm clipping, base_config().optim) and schedule."""
  optim = base_config().optim
  return optim_lib.make_optimizer(optim, total_steps=100), optim_lib.make_schedule(optim, 100)


def _sharded(mesh, out: dict) -> dict:
  """ShapeDtypeStructs with the step's batch shardings."""
  sh = step_lib.batch_shardings(mesh, out)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k]) for k, v in out.items()}


def step_config(spec: str, n: int, *, micro_batch: int = 0, gen_length: int) -> step_lib.StepConfig:
  """The on-policy step of an objective spec with n MC samples: "bgpo"; "espo:bound" (a boolean
  Hparams field switched on); "spg:logp_estimation=elbo" (a field set, parsed as its default's
  type); several joined by "+"."""
  name, _, flags = spec.partition(":")
  obj = objectives.get(name)
  defaults = {f.name: f.default for f in dataclasses.fields(obj.Hparams)}
  fields = set(defaults)
  values = {}
  for flag in filter(None, flags.split("+")):
    key, eq, raw = flag.partition("=")
    kind = type(defaults.get(key))
    values[key] = True if not eq else (raw.lower() in ("1", "true") if kind is bool
                                       else kind(raw) if kind in (int, float, str) else float(raw))
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f"objective spec {spec!r}: {name} has no hyper-parameter {unknown}; its fields: {sorted(fields)}")
  return step_lib.StepConfig(objective=name, num_mc_samples=n, micro_batch_size=micro_batch,
                             gen_length=gen_length, hparams=obj.hparams(values))


def abstract_batch(mesh, *, batch: int, prompt_len: int, gen_length: int, n: int, spec: str = "bgpo") -> dict:
  """The objective spec's on-policy batch (objectives.batch_layout; BGPO / VRPO-OL: tokens,
  attention_mask [B, P+L], advantages [B], mc_masks [n, B, L] bool, mc_weights [n, B]) as
  ShapeDtypeStructs with batch shardings (nothing allocated)."""
  scfg = step_config(spec, n, gen_length=gen_length)
  return _sharded(mesh, objectives.abstract_batch(scfg, rows=batch, prompt_len=prompt_len))


def concrete_batch(model_cfg: llada.LLaDAConfig, mesh, *, batch: int, prompt_len: int,
                   gen_length: int, n: int, seed: int = 0, spec: str = "bgpo") -> dict:
  """A random batch of the same layout on the mesh (for timing): real MC masks, random seeds,
  every response token counted, unit weights elsewhere."""
  rng = np.random.default_rng(seed)
  S = prompt_len + gen_length
  tokens = rng.integers(0, model_cfg.vocab_size, (batch, S)).astype(np.int32)
  tokens[tokens == model_cfg.mask_token_id] = model_cfg.pad_token_id
  masks, weights = masking.sample_masks(jax.random.key(seed), batch, gen_length, n)
  host = {"tokens": tokens, "attention_mask": np.ones((batch, S), np.int32),
          "advantages": rng.normal(size=(batch,)).astype(np.float32),
          "mc_masks": np.asarray(masks), "mc_weights": np.asarray(weights)}
  layout = abstract_batch(mesh, batch=batch, prompt_len=prompt_len, gen_length=gen_length, n=n, spec=spec)
  for name, a in layout.items():
    if name not in host:
      host[name] = (rng.integers(0, 2**32, a.shape, dtype=np.uint32) if a.dtype == np.uint32
                    else np.ones(a.shape, a.dtype))
  return mesh_lib.host_batch_to_global({k: host[k] for k in layout}, mesh, step_lib.BATCH_AXIS)


def single_device_mesh():
  return mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])


def compile_step(model_cfg: llada.LLaDAConfig, objective: str, n: int, mesh, *, batch: int,
                 micro_batch: int, prompt_len: int, gen_length: int, state: Any = None,
                 batch_arrays: dict | None = None) -> tuple[Any, float]:
  """(compiled train step, compile seconds). Lowers on abstract state/batch unless given."""
  optimizer, schedule = make_optimizer()
  abstract, shardings = state_lib.abstract_train_state(model_cfg, optimizer, mesh)
  b = batch_arrays if batch_arrays is not None else abstract_batch(
      mesh, batch=batch, prompt_len=prompt_len, gen_length=gen_length, n=n, spec=objective)
  scfg = step_config(objective, n, micro_batch=micro_batch, gen_length=gen_length)
  t0 = time.perf_counter()
  fn = step_lib.jit_train_step(model_cfg, scfg, optimizer, schedule, mesh, shardings, b)
  compiled = fn.lower(state if state is not None else abstract, b).compile()
  return compiled, time.perf_counter() - t0


def memory_row(model_cfg: llada.LLaDAConfig, objective: str, n: int, *, batch: int,
               micro_batch: int, prompt_len: int, gen_length: int, mesh=None) -> dict:
  """XLA's per-device memory analysis of one compiled step (bytes) plus its compile time."""
  mesh = mesh if mesh is not None else single_device_mesh()
  compiled, compile_s = compile_step(model_cfg, objective, n, mesh, batch=batch,
                                     micro_batch=micro_batch, prompt_len=prompt_len,
                                     gen_length=gen_length)
  mem = step_lib.memory_report(compiled)
  if not mem:
    raise RuntimeError(f"{jax.devices()[0].platform} gives no memory analysis for the compiled step")
  return {"objective": objective, "n": n, **mem, "compile_s": compile_s}


def sample_flops(model_cfg: llada.LLaDAConfig, batch: int, seq_len: int) -> float:
  """Model FLOPs of one MC sample's forward + backward over the batch (3 forwards)."""
  return 3.0 * llada.forward_flops(model_cfg, batch, seq_len)


def time_rows(model_cfg: llada.LLaDAConfig, objective: str, ns: Sequence[int], *, batch: int,
              micro_batch: int, prompt_len: int, gen_length: int, repeats: int,
              peak: float | None = None) -> list[dict]:
  """Wall time of the real step for each n, round-robin, fastest of `repeats` (after one warm-up).

  Each n gets its own state (the step donates it) threaded through its calls.
  Returns [{"objective", "n", "step_s", "timed_temp_bytes", "timed_total_bytes" (XLA's analysis of
  the timed executable), "time_compile_s", "model_flops", "tflops_per_s", "mfu", "all_s"}].
  """
  mesh = single_device_mesh()
  optimizer, _ = make_optimizer()
  runs = []
  for n in ns:
    state, _ = state_lib.create_train_state(model_cfg, optimizer, mesh, rng=jax.random.key(0))
    b = concrete_batch(model_cfg, mesh, batch=batch, prompt_len=prompt_len, gen_length=gen_length, n=n,
                       spec=objective)
    compiled, compile_s = compile_step(model_cfg, objective, n, mesh, batch=batch, micro_batch=micro_batch,
                                       prompt_len=prompt_len, gen_length=gen_length, state=state,
                                       batch_arrays=b)
    runs.append({"n": n, "fn": compiled, "state": state, "batch": b, "compile_s": compile_s, "all_s": []})

  def call(r: dict) -> float:
    t0 = time.perf_counter()
    r["state"], metrics = r["fn"](r["state"], r["batch"])
    common.block((r["state"], metrics))
    return time.perf_counter() - t0

  for r in runs:  # warm-up: first-touch allocations
    call(r)
  for _ in range(max(1, repeats)):
    for r in runs:
      r["all_s"].append(call(r))
  out = []
  for r in runs:
    step_s = min(r["all_s"])
    flops = sample_flops(model_cfg, batch, prompt_len + gen_length) * r["n"]
    mem = step_lib.memory_report(r["fn"])
    out.append({"objective": objective, "n": r["n"], "step_s": step_s,
                "timed_temp_bytes": mem.get("temp_bytes"), "timed_total_bytes": mem.get("total_bytes"),
                "time_compile_s": r["compile_s"], "model_flops": flops,
                "tflops_per_s": flops / step_s / 1e12,
                "mfu": flops / step_s / peak if peak else None, "peak_flops": peak, "all_s": r["all_s"]})
  return out


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
  """Least squares y = a + b x: (a, b, r2)."""
  x, y = np.asarray(xs, float), np.asarray(ys, float)
  b, a = np.polyfit(x, y, 1)
  ss = float(np.sum((y - y.mean()) ** 2))
  r2 = 1.0 - float(np.sum((y - (a + b * x)) ** 2)) / ss if ss > 0 else 1.0
  return float(a), float(b), r2


def summarize(records: Sequence[dict], flops_per_sample: float | None = None,
              peak: float | None = None) -> dict:
  """The claims per objective: memory ratio and linear fit over n (BGPO flat, VRPO-OL linear);
  over the timed rows, t(n) = t_fixed + n * t_sample and t(n) / (n * t(1))."""
  out: dict = {}
  for obj in sorted({r["objective"] for r in records}):
    rows = sorted((r for r in records if r["objective"] == obj), key=lambda r: r["n"])
    s: dict = {}
    mem = [r for r in rows if r.get("temp_bytes") is not None]
    if len(mem) >= 2:
      lo, hi = mem[0], mem[-1]
      a, b, r2 = linear_fit([r["n"] for r in mem], [r["temp_bytes"] for r in mem])
      s.update(n_range=[lo["n"], hi["n"]], temp_ratio=hi["temp_bytes"] / lo["temp_bytes"],
               total_ratio=hi["total_bytes"] / lo["total_bytes"],
               temp_fixed_bytes=a, temp_bytes_per_sample=b, temp_linear_r2=r2)
    timed = [r for r in rows if r.get("step_s")]
    t1 = next((r["step_s"] for r in timed if r["n"] == 1), None)
    if t1:
      s["time_ratio"] = {r["n"]: r["step_s"] / (r["n"] * t1) for r in timed}
    if len(timed) >= 2:
      a, b, r2 = linear_fit([r["n"] for r in timed], [r["step_s"] for r in timed])
      s.update(time_fixed_s=a, time_per_sample_s=b, time_linear_r2=r2)
      if flops_per_sample and peak and b > 0:
        s["marginal_sample_mfu"] = flops_per_sample / b / peak
    out[obj] = s
  return out


def default_run(args) -> tuple[list[dict], dict]:
  """Memory rows for every (objective, n) and time rows for the timed subset, merged by key."""
  cfg = model_config(args.model, remat=args.remat, compute_dtype=args.compute_dtype)
  lens = dict(batch=args.batch, micro_batch=args.micro_batch, prompt_len=args.prompt_len,
              gen_length=args.gen_len)
  records = []
  for obj in args.objectives:
    for n in args.ns:
      r = memory_row(cfg, obj, n, **lens)
      r.update(model=args.model, params=cfg.num_params(), tokens=args.prompt_len + args.gen_len,
               batch=args.batch, micro_batch=args.micro_batch, remat=args.remat, step_s=None)
      records.append(r)
      print(f"  memory {obj:8s} n={n:3d}: temp {r['temp_bytes'] / 2**20:9.1f} MiB  "
            f"total {r['total_bytes'] / 2**20:9.1f} MiB  (compile {r['compile_s']:.1f} s)", flush=True)
  tcfg = model_config(args.time_model, remat=args.remat, compute_dtype=args.compute_dtype)
  peak = common.matmul_peak_flops(tcfg.compute_jnp_dtype) if args.repeats > 0 else None
  by_key = {(r["objective"], r["n"]): r for r in records}
  for obj in args.objectives:
    ns = args.time_ns if args.time_ns is not None else DEFAULT_TIME_NS.get(obj, (1, 2, 4))
    if args.repeats <= 0 or not ns:
      continue
    for t in time_rows(tcfg, obj, ns, repeats=args.repeats, peak=peak, **lens):
      rec = by_key.get((obj, t["n"]))
      if rec is None:  # timed but not in the memory grid
        rec = {"objective": obj, "n": t["n"], "temp_bytes": None, "total_bytes": None}
        records.append(rec)
        by_key[(obj, t["n"])] = rec
      rec.update({k: v for k, v in t.items() if k not in ("objective", "n")},
                 timed_model=args.time_model, timed_params=tcfg.num_params())
      print(f"  time   {obj:8s} n={t['n']:3d}: {t['step_s']:.3f} s ({args.time_model})", flush=True)
  records.sort(key=lambda r: (args.objectives.index(r["objective"]), r["n"]))
  # Per-row ratios against the same objective's n = 1 row.
  for r in records:
    n1 = by_key.get((r["objective"], 1))
    if n1 and r["temp_bytes"] is not None and n1["temp_bytes"]:
      r["temp_vs_n1"] = r["temp_bytes"] / n1["temp_bytes"]
    if n1 and n1.get("step_s") and r.get("step_s"):
      r["time_ratio"] = r["step_s"] / (r["n"] * n1["step_s"])
  summary = summarize(records, sample_flops(tcfg, args.batch, args.prompt_len + args.gen_len), peak)
  return records, summary


def print_default(records: list[dict], summary: dict, args) -> None:
  rows = []
  for r in records:
    rows.append({"objective": r["objective"], "n": r["n"],
                 "temp_MiB": r["temp_bytes"] / 2**20 if r["temp_bytes"] is not None else "",
                 "total_MiB": r["total_bytes"] / 2**20 if r["total_bytes"] is not None else "",
                 "temp/n1": r.get("temp_vs_n1", ""), "compile_s": r.get("compile_s", ""),
                 "step_s": r["step_s"] if r.get("step_s") else "",
                 "t/(n*t1)": r.get("time_ratio", ""),
                 "MFU": r["mfu"] if r.get("mfu") is not None else ""})
  common.print_table(rows, ["objective", "n", "temp_MiB", "total_MiB", "temp/n1", "compile_s",
                            "step_s", "t/(n*t1)", "MFU"],
                     title=(f"Train step memory ({args.model}, {args.prompt_len}+{args.gen_len} tokens, "
                            f"batch {args.batch} / micro {args.micro_batch}, remat {args.remat}) and time "
                            f"({args.time_model}) on {common.device_description()}"))
  for obj, s in summary.items():
    parts = [obj + ":"]
    if "temp_ratio" in s:
      parts.append(f"temp(n={s['n_range'][1]})/temp(n={s['n_range'][0]}) = {s['temp_ratio']:.4f}, "
                   f"total ratio {s['total_ratio']:.4f}, slope {s['temp_bytes_per_sample'] / 2**20:.2f} "
                   f"MiB/sample (r2 {s['temp_linear_r2']:.4f});")
    if "time_per_sample_s" in s:
      mfu = s.get("marginal_sample_mfu")
      parts.append(f"time = {s['time_fixed_s']:.3f} s + {s['time_per_sample_s']:.3f} s * n "
                   f"(r2 {s['time_linear_r2']:.4f}" + (f", marginal MFU {mfu:.3f})" if mfu else ")"))
    print("  " + " ".join(parts), flush=True)


# ------------------------------------------------------------------------------ GPU fit


def largest_fitting_n(fits: Callable[[int], bool], max_n: int) -> tuple[int, list[tuple[int, bool]]]:
  """Largest n in [1, max_n] with fits(n), assuming fits is monotone (True then False).

  Doubling from 1, then bisection between the last fit and the first miss. Returns
  (n or 0 when even n = 1 does not fit, [(n, fits) probes in order]).
  """
  probes: list[tuple[int, bool]] = []

  def probe(n: int) -> bool:
    ok = bool(fits(n))
    probes.append((n, ok))
    return ok

  if not probe(1):
    return 0, probes
  lo, hi = 1, None
  while hi is None:
    nxt = min(lo * 2, max_n)
    if nxt == lo:
      return lo, probes
    if probe(nxt):
      lo = nxt
    else:
      hi = nxt
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if probe(mid):
      lo = mid
    else:
      hi = mid
  return lo, probes


def device_bytes_limit() -> int:
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    raise RuntimeError(f"device {jax.devices()[0]} reports no memory_stats()['bytes_limit']; "
                       "--gpu-fit needs a GPU/TPU, or pass --fit-bytes-limit to test the search")
  return int(stats["bytes_limit"])


def gpu_fit(model_cfg: llada.LLaDAConfig, objectives: Sequence[str], *, batch: int, micro_batch: int,
            prompt_len: int, gen_length: int, max_n: int, bytes_limit: int | None = None,
            headroom: float = 0.95) -> list[dict]:
  """Per objective, the largest n whose compiled step's total bytes <= headroom * bytes_limit."""
  limit = int(bytes_limit if bytes_limit is not None else device_bytes_limit())
  budget = headroom * limit
  out = []
  for obj in objectives:
    mem: dict[int, dict] = {}

    def fits(n: int) -> bool:
      try:
        mem[n] = memory_row(model_cfg, obj, n, batch=batch, micro_batch=micro_batch,
                            prompt_len=prompt_len, gen_length=gen_length)
      except Exception as e:  # noqa: BLE001 -- an out-of-memory compile error means "does not fit"
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
          raise
        mem[n] = {"total_bytes": None, "error": str(e)[:200]}
        return False
      ok = mem[n]["total_bytes"] <= budget
      print(f"  fit {obj:8s} n={n:4d}: total {mem[n]['total_bytes'] / 1e9:7.2f} GB "
            f"{'<=' if ok else '>'} {budget / 1e9:.2f} GB", flush=True)
      return ok

    best, probes = largest_fitting_n(fits, max_n)
    rec = {"objective": obj, "max_fitting_n": best, "capped_at_max_n": best == max_n,
           "bytes_limit": limit, "headroom": headroom,
           "probes": [{"n": n, "fits": ok, "total_bytes": mem[n].get("total_bytes"),
                       "temp_bytes": mem[n].get("temp_bytes")} for n, ok in probes],
           "d_model": model_cfg.d_model, "n_layers": model_cfg.n_layers, "params": model_cfg.num_params(),
           "prompt_len": prompt_len, "gen_len": gen_length, "batch": batch, "micro_batch": micro_batch}
    if best:
      rec.update(temp_bytes=mem[best]["temp_bytes"], total_bytes=mem[best]["total_bytes"])
    out.append(rec)
  return out


# ------------------------------------------------------------------------------ 8B plan


def plan_records(variants: Sequence[tuple[str, str, int]], *, model: str = "llada_8b",
                 n_layers: int | None = None, prompt_len: int = 512, gen_length: int = 512,
                 per_device_micro: int = 1, batch: int = 128, remat: str = "full",
                 mesh_shape: tuple[int, int, int] = (1, PLAN_DEVICES, 1),
                 emit: Callable[[dict], None] | None = None) -> list[dict]:
  """Per-device memory of the sharded step for each (objective, param_dtype, n); needs the devices
  of `mesh_shape` (8 fake CPU devices by default). Abstract arrays only."""
  mesh = mesh_lib.make_mesh(mesh_shape)
  dp = mesh_lib.data_parallel_size(mesh)
  out = []
  for obj, pdt, n in variants:
    over = {"n_layers": n_layers} if n_layers else {}
    cfg = model_config(model, remat=remat, param_dtype=pdt, compute_dtype="bfloat16", **over)
    t0 = time.perf_counter()
    r = memory_row(cfg, obj, n, batch=batch, micro_batch=per_device_micro * dp, prompt_len=prompt_len,
                   gen_length=gen_length, mesh=mesh)
    r.update(model=model, n_layers=cfg.n_layers, param_dtype=pdt, compute_dtype="bfloat16", remat=remat,
             mesh=list(mesh_shape), per_device_micro=per_device_micro, batch=batch,
             tokens=prompt_len + gen_length, params=cfg.num_params(), wall_s=time.perf_counter() - t0)
    out.append(r)
    if emit:
      emit(r)
  return out


def extrapolate_layers(a: dict, b: dict, layers: int) -> dict:
  """Per-device bytes of `layers` layers from two compiles at a["n_layers"] < b["n_layers"] (linear:
  the blocks are stacked and scanned, so every byte count is affine in the layer count)."""
  la, lb = a["n_layers"], b["n_layers"]
  out = dict(b, n_layers=layers, extrapolated_from=[la, lb])
  for k, v in a.items():
    if k.endswith("_bytes") and isinstance(v, (int, float)):
      per = (b[k] - v) / (lb - la)
      out[k] = v + per * (layers - la)
      out[k.replace("_bytes", "_bytes_per_layer")] = per
  return out


def _plan_worker(spec: dict) -> None:
  """Runs inside the 8-device subprocess; prints one `RECORD {json}` line per compiled variant."""
  if "config_path" not in spec and jax.device_count() < PLAN_DEVICES:
    raise SystemExit(f"--plan-8b worker sees {jax.device_count()} devices, needs {PLAN_DEVICES}: "
                     "set XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing jax")
  emit = lambda r: print("RECORD " + json.dumps(r, default=float), flush=True)
  if "config_path" in spec:
    if jax.device_count() != spec["devices"]:
      raise SystemExit(f"plan worker sees {jax.device_count()} devices, expected {spec['devices']}")
    name = " ".join([spec["config_path"], *spec.get("overrides", [])])
    plan_config_records(load_config_file(spec["config_path"], spec.get("overrides", [])), name, emit=emit,
                        n_layers=spec.get("n_layers"))
    return
  plan_records([tuple(v) for v in spec.pop("variants")], emit=emit, **spec)


def run_plan_subprocess(spec: dict, timeout_s: float = 3600) -> tuple[list[dict], int, str]:
  """Starts the plan worker with 8 fake CPU devices; returns (records, return code, stderr tail).

  Records are streamed, so variants finished before a crash (e.g. the OOM killer) are kept.
  """
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "").replace(f"--xla_force_host_platform_device_count={PLAN_DEVICES}", "")
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={PLAN_DEVICES}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-m", "bgpo_jax.benchmarks.memory", "--plan-worker", json.dumps(spec)],
                        env=env, capture_output=True, text=True, timeout=timeout_s)
  records = [json.loads(line[len("RECORD "):]) for line in proc.stdout.splitlines()
             if line.startswith("RECORD ")]
  return records, proc.returncode, proc.stderr[-2000:]


def plan_8b(args) -> list[dict]:
  """The --plan-8b table: full-depth compiles, or (on failure or --plan-layers a,b) two shallow
  compiles per variant extrapolated per layer to 32."""
  variants = [v for v in PLAN_VARIANTS if v[0] in args.objectives]
  base = dict(model="llada_8b", prompt_len=args.plan_prompt_len, gen_length=args.plan_gen_len,
              per_device_micro=args.plan_micro, batch=args.plan_batch, remat=args.remat)
  full_layers = llada.LLaDAConfig.preset("llada_8b").n_layers
  records: list[dict] = []
  if not args.plan_layers:
    records, rc, err = run_plan_subprocess(dict(base, variants=variants))
    if rc != 0:
      print(f"  plan worker exited with {rc} after {len(records)} of {len(variants)} variants "
            f"(-9 = killed, e.g. out of host memory); stderr tail:\n{err[-800:]}", flush=True)
  done = {(r["objective"], r["param_dtype"], r["n"]) for r in records}
  todo = [v for v in variants if v not in done]
  if todo:
    la, lb = args.plan_layers or (4, 8)
    print(f"  compiling {len(todo)} variant(s) with {la} and {lb} layers, extrapolating to {full_layers}",
          flush=True)
    shallow = {}
    for layers in (la, lb):
      recs, rc, err = run_plan_subprocess(dict(base, variants=todo, n_layers=layers))
      if rc != 0:
        raise RuntimeError(f"plan worker with n_layers={layers} failed ({rc}):\n{err}")
      shallow[layers] = {(r["objective"], r["param_dtype"], r["n"]): r for r in recs}
    for v in todo:
      records.append(extrapolate_layers(shallow[la][v], shallow[lb][v], full_layers))
  order = {v: i for i, v in enumerate(variants)}
  records.sort(key=lambda r: order[(r["objective"], r["param_dtype"], r["n"])])
  for r in records:
    r["h100_fraction"] = r["total_bytes"] / H100_BYTES
    r["tpu_v5p_fraction"] = r["total_bytes"] / TPU_V5P_BYTES
    r["fits_h100"] = r["total_bytes"] <= H100_BYTES
    r["fits_tpu_v5p"] = r["total_bytes"] <= TPU_V5P_BYTES
  return records


def print_plan(records: list[dict], args) -> None:
  rows = [{"objective": r["objective"], "params": r["param_dtype"], "n": r["n"], "layers": r["n_layers"],
           "arg_GB": r["argument_bytes"] / 1e9, "out_GB": r["output_bytes"] / 1e9,
           "alias_GB": r["alias_bytes"] / 1e9, "temp_GB": r["temp_bytes"] / 1e9,
           "total_GB": r["total_bytes"] / 1e9, "H100_80GB": f"{100 * r['h100_fraction']:.1f}%",
           "v5p_95GB": f"{100 * r['tpu_v5p_fraction']:.1f}%",
           "compile_s": r.get("compile_s", ""),
           "note": "extrapolated" if "extrapolated_from" in r else ""} for r in records]
  common.print_table(rows, ["objective", "params", "n", "layers", "arg_GB", "out_GB", "alias_GB",
                            "temp_GB", "total_GB", "H100_80GB", "v5p_95GB", "compile_s", "note"],
                     title=(f"LLaDA-8B train step, per device, {PLAN_DEVICES}-way FSDP mesh (1,{PLAN_DEVICES},1), "
                            f"{args.plan_prompt_len}+{args.plan_gen_len} tokens, micro-batch {args.plan_micro}/device, "
                            f"compute bf16, remat {args.remat} (XLA:CPU analysis)"))


# ------------------------------------------------------------------------------ plan a config


def load_config_file(path: str, overrides: Sequence[str] = ()):
  """A config file (configs/*.py) with `--config.k=v` overrides, parsed by ml_collections'
  config_flags exactly as `python -m bgpo_jax.main --config=FILE --config.k=v` parses them."""
  from absl import flags
  from ml_collections import config_flags

  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    raise ValueError(f"overrides {bad} must look like --config.rl.num_mc_samples=8")
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True)
  argv = ["plan", f"--config={path}", *overrides]
  saved, sys.argv = sys.argv, argv  # config_flags reads the overrides from sys.argv
  try:
    fv(argv)
  finally:
    sys.argv = saved
  return fv.config


def plan_prompt_len(config) -> int:
  """The longest prompt bucket a run of `config` can use: the smallest bucket holding
  task.max_prompt_tokens (longer prompts are truncated or dropped), else the largest bucket."""
  buckets = sorted(int(b) for b in config.rollout.prompt_buckets)
  return next((b for b in buckets if b >= config.task.max_prompt_tokens), buckets[-1])


def _shard_bytes(tree) -> int:
  """Bytes of one device's shards of a tree of ShapeDtypeStructs with shardings."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
  return total


def config_batch(config, mesh, scfg, *, rows: int, prompt_len: int) -> dict:
  """The abstract RL batch the trainer feeds this config's step (objectives.batch_layout)."""
  del config  # the layout follows from the step's settings alone
  return _sharded(mesh, objectives.abstract_batch(scfg, rows=rows, prompt_len=prompt_len))


def _plan_model(config, n_layers: int | None):
  """The family's full-size preset under config.model's precision and memory knobs -> (preset
  name, the resolved remat policy, model config); n_layers: a shallower model."""
  from bgpo_jax import config as config_lib
  from bgpo_jax.models import family

  m = config.model
  big = BIG_PRESETS[family.family_of(m.family)]
  remat = config_lib.resolved_remat_policy(config)
  model_cfg = family.preset(m.family, big, param_dtype=m.param_dtype, compute_dtype=m.compute_dtype,
                            remat_policy=remat, scan_unroll=m.scan_unroll,
                            logits_chunk=m.logits_chunk, **({"n_layers": n_layers} if n_layers else {}))
  return big, remat, model_cfg


def _reference_bytes(rl, params) -> int:
  """Per-device bytes of the frozen KL reference (rl.reference_dtype, sharded like the abstract
  `params`): with rl.kl_beta > 0 it stays resident through the whole RL phase, beside every
  program planned here; 0 without a KL."""
  if rl.kl_beta > 0:
    ref_dtype = jnp.dtype(rl.reference_dtype)
    return _shard_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, ref_dtype, sharding=x.sharding),
                                     params))
  return 0


def _old_terms_memory(model_cfg, scfg, mesh, abstract, shardings, batch: dict, base=None,
                      base_shardings=None) -> tuple[dict, float]:
  """The no-gradient pass storing the old policy's (mu > 1) or the reference's terms before the
  first update, compiled on the batch without the fields it stores -> (memory report, seconds).
  base / base_shardings: a LoRA run's frozen base (the pass runs base + adapters)."""
  stored = {f.name for f in (scfg.impl.old_field, scfg.impl.ref_field) if f is not None}
  terms_batch = {k: v for k, v in batch.items() if k not in stored}
  params, param_shardings, extra = abstract.params, shardings.params, 0
  if base is not None:
    from bgpo_jax.models import transformer
    stand_in, extra = cpu_stand_in(base)
    params = transformer.Adapted(stand_in, params, scfg.lora.scale)
    param_shardings = transformer.Adapted(base_shardings, param_shardings, scfg.lora.scale)
  t0 = time.perf_counter()
  fn = step_lib.jit_old_terms(model_cfg, scfg, mesh, param_shardings, terms_batch)
  mem = _less_arguments(step_lib.memory_report(fn.lower(params, terms_batch).compile()), extra)
  return mem, time.perf_counter() - t0


def _sampler_memory(config, model_cfg, mesh, params, *, rows: int, prompt_len: int
                    ) -> tuple[int, dict, float]:
  """The trainer's rollout sampler compiled on the abstract `params` (a stub tokenizer: only the
  special ids matter) -> (rows per call, memory report, seconds)."""
  import types

  from bgpo_jax import tasks as tasks_lib
  from bgpo_jax.models import family

  stub_tok = types.SimpleNamespace(mask_id=model_cfg.mask_token_id, eos_id=model_cfg.eos_token_id,
                                   eot_id=EOT_IDS[family.family_of(config.model.family)])
  sampler = tasks_lib.build_rollout_sampler(config, model_cfg, stub_tok, mesh, "rollout")
  call_rows = config.rollout.batch_size or rows
  tok = jax.ShapeDtypeStruct((call_rows, prompt_len), jnp.int32, sharding=sampler._batch_sharding)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = sampler._generate.lower(params, tok, tok, jax.random.key(0)).compile()
  mem = step_lib.memory_report(compiled)
  return call_rows, mem, time.perf_counter() - t0


def plan_config_records(config, name: str, *, emit: Callable[[dict], None] | None = None,
                        n_layers: int | None = None) -> list[dict]:
  """Per-device memory of what `config` runs on this process's devices, with the family's full
  size model (config.model.family: LLaDA-8B or Dream-7B): its train step and its rollout sampler,
  compiled ahead of time on abstract arrays. n_layers: a shallower model (quick checks; the
  shipped numbers use all layers)."""
  from bgpo_jax import config as config_lib
  from bgpo_jax.train import run as run_lib

  mesh = mesh_lib.make_mesh(config.mesh.shape)
  dp = mesh_lib.data_parallel_size(mesh)
  m, rl = config.model, config.rl
  big, remat, model_cfg = _plan_model(config, n_layers)
  rows = rl.prompts_per_step * rl.group_size  # every group kept: the largest batch a step trains on
  prompt_len = plan_prompt_len(config)
  # The trainer's own step settings (objective, n, micro-batch rows, off-policy, KL ...).
  scfg = run_lib.step_config(config, "rl", dp)
  optimizer = optim_lib.make_optimizer(config.optim, config.total_steps)
  schedule = optim_lib.make_schedule(config.optim, config.total_steps)
  lora = config_lib.lora_spec(config)
  if lora is None:
    abstract, shardings = state_lib.abstract_train_state(model_cfg, optimizer, mesh)
    base = base_shardings = None
  else:
    abstract, shardings, base, base_shardings = abstract_lora_state(model_cfg, lora, optimizer, mesh,
                                                                    config.lora.base_dtype)
  common_fields = dict(config=name, devices=int(jax.device_count()), mesh=[int(v) for v in mesh.devices.shape],
                       model=big, n_layers=model_cfg.n_layers, params=model_cfg.num_params(), param_dtype=m.param_dtype,
                       compute_dtype=m.compute_dtype, remat=remat, objective=rl.objective,
                       n=rl.num_mc_samples, prompt_len=prompt_len, gen_length=config.rollout.gen_length,
                       lora_rank=lora.r if lora else 0, trainable_params=_count(abstract.params),
                       base_dtype=config.lora.base_dtype if lora else None)
  out = []

  def add(r):
    r["fits_h100"] = r["peak_bytes"] <= H100_BYTES
    r["fits_tpu_v5p"] = r["peak_bytes"] <= TPU_V5P_BYTES
    out.append(r)
    if emit:
      emit(r)

  batch = config_batch(config, mesh, scfg, rows=rows, prompt_len=prompt_len)
  micro_rows = config_lib.micro_batch_rows(rl.micro_batch_per_device, rows, dp) or rows
  if lora is None:
    reference = _reference_bytes(rl, abstract.params)
  else:
    # From fresh adapters without a warm-up the reference is the frozen base itself (no bytes);
    # otherwise it is a copy of the adapters at RL start.
    fresh = not config.init.adapter and not config.sft.steps
    reference = 0 if rl.kl_beta <= 0 or fresh else _shard_bytes(abstract.params)
  base_bytes = 0 if base is None else _shard_bytes(base)
  t0 = time.perf_counter()
  fn = step_lib.jit_train_step(model_cfg, scfg, optimizer, schedule, mesh, shardings, batch, base_shardings)
  if base is None:
    mem = step_lib.memory_report(fn.lower(abstract, batch).compile())
  else:
    stand_in, extra = cpu_stand_in(base)
    mem = _less_arguments(step_lib.memory_report(fn.lower(abstract, batch, stand_in).compile()), extra)
  # A LoRA step's frozen base is one of its arguments (counted in its total).
  add({**common_fields, "what": "train_step", "rows": rows, "micro_batch_rows": micro_rows,
       **mem, "resident_reference_bytes": reference, "peak_bytes": mem["total_bytes"] + reference,
       "compile_s": time.perf_counter() - t0})

  resident = _shard_bytes(abstract.opt_state)
  if (scfg.off_policy and scfg.impl.old_field is not None) or (scfg.kl_beta > 0 and scfg.impl.ref_field is not None):
    # The train state (optimizer included) and the reference stay resident through that pass; a
    # LoRA run's pass reads base + adapters (its arguments).
    mem, seconds = _old_terms_memory(model_cfg, scfg, mesh, abstract, shardings, batch, base, base_shardings)
    add({**common_fields, "what": "old_terms", "rows": rows, "micro_batch_rows": micro_rows, **mem,
         "resident_opt_state_bytes": resident, "resident_reference_bytes": reference,
         "peak_bytes": mem["total_bytes"] + resident + reference, "compile_s": seconds})

  # The rollout sampler runs from the train state's params (the optimizer state stays resident), a
  # LoRA run's from the merged weights in the compute dtype, made once per step (train.run.LoraBase.
  # merged), while the base and the adapters stay resident.
  # With lora.sampler_weights="unmerged" it runs base + adapters (its arguments), no merged copy.
  if base is None:
    sample_params, resident_lora = abstract.params, 0
    sample_params, extra = cpu_stand_in(sample_params)
  elif config.lora.sampler_weights == "unmerged":
    from bgpo_jax.models import transformer
    stand_in, extra = cpu_stand_in(base)
    sample_params, resident_lora = transformer.Adapted(stand_in, abstract.params, lora.scale), 0
  else:
    cdt = model_cfg.compute_jnp_dtype
    sample_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, cdt, sharding=x.sharding), base)
    resident_lora = base_bytes + _shard_bytes(abstract.params)
    sample_params, extra = cpu_stand_in(sample_params)
  call_rows, mem, seconds = _sampler_memory(config, model_cfg, mesh, sample_params, rows=rows,
                                            prompt_len=prompt_len)
  mem = _less_arguments(mem, extra)
  add({**common_fields, "what": "sampler", "rows": call_rows, "steps": config.rollout.steps,
       "cache": config.rollout.cache, **mem, "resident_opt_state_bytes": resident,
       "resident_reference_bytes": reference, "resident_lora_bytes": resident_lora,
       "peak_bytes": mem["total_bytes"] + resident + reference + resident_lora, "compile_s": seconds})
  return out


def _count(tree) -> int:
  return int(sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(tree)))


def abstract_lora_state(model_cfg, spec, optimizer, mesh, base_dtype: str):
  """A LoRA run's abstract train state over the adapters (param dtype), its shardings, and the
  abstract frozen base in `base_dtype` with its shardings: what train.run builds, without memory."""
  from bgpo_jax.models import lora as lora_lib

  a_shard = state_lib.adapter_shardings(model_cfg, spec, mesh)
  adapters = jax.eval_shape(lambda: lora_lib.init_adapters(model_cfg, spec, jax.random.key(0),
                                                           model_cfg.param_jnp_dtype))
  opt_state = jax.eval_shape(optimizer.init, adapters)
  shardings = state_lib.state_shardings(optimizer, opt_state, a_shard, mesh)
  abstract = state_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=adapters, opt_state=opt_state)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  base_shardings = state_lib.param_shardings(model_cfg, mesh)
  shapes = jax.eval_shape(lambda: family_lib.module_for(model_cfg).init_params(model_cfg, jax.random.key(0)))
  dtype = jnp.dtype(base_dtype)
  base = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s), shapes, base_shardings)
  return abstract, shardings, base, base_shardings


def cpu_stand_in(tree):
  """XLA:CPU has no bfloat16 matmul: for a bf16 weight it upcasts the whole stacked [L, ...] array to
  float32 outside the layer loop and keeps that copy through the program (a LLaDA-8B bf16 base: 32
  GB that no accelerator allocates). A plan of bf16 weights therefore compiles them as float32
  stand-ins (which XLA:CPU's dots read in place; the model still casts each layer to the compute
  dtype) -> (stand-in tree, bytes to take off the program's arguments: the stand-ins' extra half)."""
  if jax.default_backend() != "cpu":
    return tree, 0
  wide = lambda x: x.dtype == jnp.bfloat16  # noqa: E731
  out = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding) if wide(x) else x, tree)
  extra = _shard_bytes(out) - _shard_bytes(tree)
  return out, extra


def _less_arguments(mem: dict, extra: int) -> dict:
  """A memory report with `extra` argument bytes taken off (cpu_stand_in's float32 widening)."""
  if not extra:
    return mem
  return dict(mem, argument_bytes=mem["argument_bytes"] - extra, total_bytes=mem["total_bytes"] - extra,
              cpu_stand_in_bytes=extra)


def run_config_plan_subprocess(config_path: str, devices: int, timeout_s: float = 3600,
                               n_layers: int | None = None, overrides: Sequence[str] = ()
                               ) -> tuple[list[dict], int, str]:
  """plan_config_records for one config file in a subprocess with `devices` fake CPU devices."""
  env = dict(os.environ)
  flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                   if not f.startswith("--xla_force_host_platform_device_count"))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  spec = {"config_path": config_path, "devices": devices, "n_layers": n_layers, "overrides": list(overrides)}
  proc = subprocess.run([sys.executable, "-m", "bgpo_jax.benchmarks.memory", "--plan-worker", json.dumps(spec)],
                        env=env, capture_output=True, text=True, timeout=timeout_s)
  records = [json.loads(line[len("RECORD "):]) for line in proc.stdout.splitlines()
             if line.startswith("RECORD ")]
  return records, proc.returncode, proc.stderr[-2000:]


def plan_configs(paths: Sequence[str], devices: int, n_layers: int | None = None,
                 overrides: Sequence[str] = ()) -> list[dict]:
  """--plan-8b --config=FILE[,FILE...] [--config.k=v ...]: the records of every config, one
  subprocess each (the overrides apply to every config)."""
  records = []
  for path in paths:
    recs, rc, err = run_config_plan_subprocess(path, devices, n_layers=n_layers, overrides=overrides)
    if rc != 0:
      raise RuntimeError(f"planning {path} on {devices} devices failed ({rc}):\n{err}")
    records += recs
  return records


def print_config_plan(records: list[dict]) -> None:
  rows = [{"config": r["config"], "what": r["what"], "devices": r["devices"], "mesh": tuple(r["mesh"]),
           "rows": r["rows"], "n": r["n"], "tokens": r["prompt_len"] + r["gen_length"],
           "arg_GB": r["argument_bytes"] / 1e9, "temp_GB": r["temp_bytes"] / 1e9,
           "total_GB": r["total_bytes"] / 1e9, "peak_GB": r["peak_bytes"] / 1e9,
           "of_40GB": f"{100 * r['peak_bytes'] / 40e9:.1f}%",
           "H100_80GB": f"{100 * r['peak_bytes'] / H100_BYTES:.1f}%",
           "v5p_95GB": f"{100 * r['peak_bytes'] / TPU_V5P_BYTES:.1f}%",
           "fits": "yes" if r["fits_h100"] else ("v5p only" if r["fits_tpu_v5p"] else "NO"),
           "compile_s": r["compile_s"]} for r in records]
  common.print_table(rows, ["config", "what", "devices", "mesh", "rows", "n", "tokens", "arg_GB", "temp_GB",
                            "total_GB", "peak_GB", "of_40GB", "H100_80GB", "v5p_95GB", "fits", "compile_s"],
                     title="The config's full-size model (LLaDA-8B / Dream-7B) as each config runs it, per "
                           "device (XLA:CPU analysis of AOT compiles; peak = the program's total + what stays "
                           "resident beside it: the optimizer state for the sampler and old_terms, the KL "
                           "reference when rl.kl_beta > 0, a LoRA run's base and adapters beside a merged "
                           "sampler)")


# ------------------------------------------------------------------------------ main


def _ints(s: str) -> tuple[int, ...]:
  return tuple(int(x) for x in s.split(",") if x)


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--objectives", default="bgpo,vrpo_ol", type=lambda s: s.split(","))
  ap.add_argument("--ns", default=",".join(map(str, DEFAULT_NS)), type=_ints, help="n for the memory rows")
  ap.add_argument("--model", default="small", choices=["tiny", "small", "gpu_1b", "llada_8b"],
                  help="model of the memory rows")
  ap.add_argument("--prompt-len", type=int, default=256)
  ap.add_argument("--gen-len", type=int, default=256)
  ap.add_argument("--batch", type=int, default=8, help="sequences per step")
  ap.add_argument("--micro-batch", type=int, default=2, help="rows per micro-batch (0 = whole batch)")
  ap.add_argument("--remat", default="full", choices=list(llada.REMAT_POLICIES))
  ap.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "bfloat16"])
  ap.add_argument("--time-model", default="tiny", choices=["tiny", "small", "gpu_1b"],
                  help="model of the timed steps (same batch and lengths)")
  ap.add_argument("--time-ns", default=None, type=_ints,
                  help="n to time for every objective (default: bgpo 1,2,4,8,16; vrpo_ol 1,2,4)")
  ap.add_argument("--repeats", type=int, default=2, help="timed runs per step after a warm-up; 0 = no timing")
  ap.add_argument("--out", default=None, help="write the records as JSON (summary in FILE.meta.json)")
  ap.add_argument("--plan-8b", action="store_true", help="LLaDA-8B per-device memory plan on 8 fake devices")
  ap.add_argument("--config", default=None,
                  help="with --plan-8b: plan what these task config files run (comma-separated)")
  ap.add_argument("--devices", type=int, default=PLAN_DEVICES, help="with --plan-8b --config: fake devices")
  ap.add_argument("--plan-n-layers", type=int, default=None,
                  help="with --plan-8b --config: a shallower LLaDA-8B (quick checks; default all 32 layers)")
  ap.add_argument("--plan-layers", default=None, type=_ints,
                  help="compile with these two layer counts and extrapolate to 32 (e.g. 4,8)")
  ap.add_argument("--plan-prompt-len", type=int, default=512)
  ap.add_argument("--plan-gen-len", type=int, default=512)
  ap.add_argument("--plan-micro", type=int, default=1, help="rows per device per micro-batch")
  ap.add_argument("--plan-batch", type=int, default=128, help="global sequences per step (16 prompts x 8)")
  ap.add_argument("--gpu-fit", action="store_true", help="largest n that fits on this device (GPU/TPU)")
  ap.add_argument("--fit-model", default="gpu_1b", choices=["tiny", "small", "gpu_1b"])
  ap.add_argument("--fit-gen-len", type=int, default=512)
  ap.add_argument("--fit-max-n", type=int, default=256)
  ap.add_argument("--fit-headroom", type=float, default=0.95, help="fraction of bytes_limit usable")
  ap.add_argument("--fit-bytes-limit", type=float, default=None,
                  help="override the device's bytes_limit (to test the search on a CPU)")
  ap.add_argument("--plan-worker", default=None, help=argparse.SUPPRESS)
  args, rest = ap.parse_known_args(argv)
  args.config_overrides = [a for a in rest if a.startswith("--config.")]
  if len(args.config_overrides) != len(rest):
    ap.error(f"unrecognized arguments: {' '.join(a for a in rest if not a.startswith('--config.'))}")
  if args.config_overrides and not (args.plan_8b and args.config):
    ap.error("--config.k=v overrides need --plan-8b --config=FILE")
  if args.plan_layers and len(args.plan_layers) != 2:
    ap.error(f"--plan-layers {args.plan_layers} needs two layer counts, e.g. 4,8")
  for obj in args.objectives:
    try:
      step_config(obj, 1, gen_length=args.gen_len)
    except ValueError as e:
      ap.error(str(e))
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  if args.plan_worker is not None:
    _plan_worker(json.loads(args.plan_worker))
    return []
  t0 = time.time()
  meta: dict = {"device": common.device_description(), "args": vars(args), "loadavg_start": os.getloadavg()}
  if args.plan_8b and args.config:
    records = plan_configs([p for p in args.config.split(",") if p], args.devices, args.plan_n_layers,
                           args.config_overrides)
    print_config_plan(records)
  elif args.plan_8b:
    records = plan_8b(args)
    print_plan(records, args)
  elif args.gpu_fit:
    cfg = model_config(args.fit_model, remat=args.remat, compute_dtype=args.compute_dtype)
    records = gpu_fit(cfg, args.objectives, batch=args.batch, micro_batch=args.micro_batch,
                      prompt_len=args.prompt_len, gen_length=args.fit_gen_len, max_n=args.fit_max_n,
                      bytes_limit=args.fit_bytes_limit, headroom=args.fit_headroom)
    common.print_table([{k: r.get(k) for k in ("objective", "max_fitting_n", "capped_at_max_n", "bytes_limit",
                                                 "total_bytes", "params")} for r in records],
                       ["objective", "max_fitting_n", "capped_at_max_n", "bytes_limit", "total_bytes", "params"],
                       title=f"Largest n that fits ({args.fit_model}, {args.prompt_len}+{args.fit_gen_len} tokens) "
                             f"on {common.device_description()}")
  else:
    records, summary = default_run(args)
    print_default(records, summary, args)
    meta["summary"] = summary
  meta.update(wall_s=time.time() - t0, loadavg_end=os.getloadavg())
  print(f"  wall {meta['wall_s']:.0f} s; load average {meta['loadavg_start'][0]:.2f} -> "
        f"{meta['loadavg_end'][0]:.2f} (1 min)", flush=True)
  common.write_json(args.out, records, meta=meta)
  return records


if __name__ == "__main__":
  main()
