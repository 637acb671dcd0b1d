"""BGPO train-step speed against layer-scan unrolling and micro-batch size (the CPU demo's knobs).

python -m bgpo_jax.benchmarks.train_step [--model tiny --batch 128 --n 8 --prompt-len 48
    --gen-len 16 --micro 0,32,16 --unroll 1,4 --impls auto --repeats 3] [--out FILE]

Defaults are the demo's RL step: 16 prompts x 8 responses, 48 prompt + 16 generated tokens,
n = 8 MC samples, float32 on CPU. Compile time is reported apart from the steady-state step.
FLOPs count 3 x forward (forward + backward) of every MC sample over the whole sequence; MFU
divides by the measured matmul peak of this machine. --impls xla,auto times the original
grouped-einsum attention next to today's default (model.attention_impl) in the same run.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from bgpo_jax.benchmarks.common import device_description, matmul_peak_flops, print_table, write_json
from bgpo_jax.config import base_config
from bgpo_jax.diffusion import masking
from bgpo_jax.models import family
from bgpo_jax.train import mesh as mesh_lib
from bgpo_jax.train import optimizer as optim_lib
from bgpo_jax.train import state as state_lib
from bgpo_jax.train import step as step_lib


def measure(model: str, batch: int, n: int, prompt_len: int, gen_len: int, micro: int, unroll: int,
            compute_dtype: str, repeats: int, attention_impl: str = "auto", family_name: str = "llada",
            remat: str = "none") -> dict:
  from bgpo_jax.benchmarks.forward import preset_parts  # m1b: the ~1B GPU model
  name, overrides = preset_parts(model, family_name)
  cfg = family.preset(family_name, name, **{**overrides, "param_dtype": "float32", "compute_dtype": compute_dtype,
                                            "remat_policy": remat, "scan_unroll": unroll,
                                            "attention_impl": attention_impl})
  c = base_config()
  c.optim.learning_rate = 1e-4
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  optimizer = optim_lib.make_optimizer(c.optim, 10)
  schedule = optim_lib.make_schedule(c.optim, 10)
  state, shardings = state_lib.create_train_state(cfg, optimizer, mesh, rng=jax.random.key(0))
  rng = np.random.default_rng(0)
  seq = prompt_len + gen_len
  masks, weights = masking.sample_masks(jax.random.key(1), batch, gen_len, n, estimator="stratified")
  host = {"tokens": rng.integers(5, cfg.vocab_size - 5, (batch, seq)).astype(np.int32),
          "attention_mask": np.ones((batch, seq), np.int32),
          "advantages": rng.normal(size=batch).astype(np.float32),
          "mc_masks": np.asarray(masks), "mc_weights": np.asarray(weights)}
  data = mesh_lib.host_batch_to_global(host, mesh, step_lib.BATCH_AXIS)
  scfg = step_lib.StepConfig(objective="bgpo", num_mc_samples=n, gen_length=gen_len, micro_batch_size=micro)
  fn = step_lib.jit_train_step(cfg, scfg, optimizer, schedule, mesh, shardings, data)
  t0 = time.perf_counter()
  compiled = fn.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  state, _ = compiled(state, data)  # warm-up (the state is donated: thread it through)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, _ = compiled(state, data)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  flops = 3.0 * family.module_for(cfg).forward_flops(cfg, batch, seq) * n
  return {"family": family_name, "model": model, "attn": attention_impl, "batch": batch, "n": n, "seq": seq,
          "micro": micro or batch, "unroll": unroll,
          "compile_s": compile_s, "step_s": step_s, "GFLOP_s": flops / step_s / 1e9,
          "temp_MiB": step_lib.memory_report(compiled).get("temp_bytes", 0) / 2**20}


def _ints(s: str) -> list[int]:
  return [int(x) for x in s.split(",") if x]


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="tiny", choices=["tiny", "small", "m1b"],
                  help="m1b: benchmarks.forward's ~1.3B LLaDA (the GPU row, launch/gpu_bench.sh)")
  ap.add_argument("--remat", default="none", help="model.remat_policy (layers.REMAT_POLICIES)")
  ap.add_argument("--family", default="llada", help="model families, comma separated (llada,dream: side by side)")
  ap.add_argument("--batch", type=int, default=128, help="sequences per step")
  ap.add_argument("--n", type=int, default=8, help="MC samples per sequence")
  ap.add_argument("--prompt-len", type=int, default=48)
  ap.add_argument("--gen-len", type=int, default=16)
  ap.add_argument("--micro", type=_ints, default=[0, 32, 16], help="rows per micro-batch (0 = whole batch)")
  ap.add_argument("--unroll", type=_ints, default=[1, 4], help="layers per layer-scan iteration")
  ap.add_argument("--impls", default="auto", help="attention implementations (llada.ATTENTION_IMPLS)")
  ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=None)
  a = ap.parse_args(argv)
  peak = matmul_peak_flops()
  rows = []
  load0 = os.getloadavg()[0]
  runs = [(u, m, i, f) for u in a.unroll for m in a.micro for i in a.impls.split(",") for f in a.family.split(",")]
  for unroll, micro, impl, fam in runs:
    r = measure(a.model, a.batch, a.n, a.prompt_len, a.gen_len, micro, unroll, a.compute_dtype,
                a.repeats, impl, fam, a.remat)
    r["MFU"] = r["GFLOP_s"] * 1e9 / peak
    rows.append(r)
    print(r, flush=True)
  print(f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
  print_table(rows, ["family", "model", "attn", "batch", "n", "seq", "micro", "unroll", "compile_s", "step_s", "GFLOP_s", "MFU",
                     "temp_MiB"],
              title=f"BGPO train step; matmul peak {peak / 1e9:.0f} GFLOP/s; {device_description()}")
  write_json(a.out, rows, meta={"peak_flops": peak, "device": device_description()})


if __name__ == "__main__":
  main()
