"""Worker for test_sharding.py / test_distributed.py (run as a subprocess; not collected by pytest).

mode "meshes": with 8 host CPU devices, runs one BGPO train step on several meshes and prints JSON
  with loss, updated-parameter checksums and parameter partition specs per mesh; plus XLA's
  per-device memory and dot shapes of a step whose activations dominate, on one device and on an
  8-way FSDP mesh (compiled only); and the step with splash attention on a (2, 2, 2) mesh,
  interpreted and lowered for a TPU.
mode "distributed": one of several processes started by the test; joins jax.distributed, feeds
  its share of the batch, prints the step's loss and parameter checksum.
"""

import dataclasses
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bgpo_jax.config import base_config
from bgpo_jax.diffusion import masking, sampler
from bgpo_jax.models import attention, llada
from bgpo_jax.train import mesh as mesh_lib
from bgpo_jax.train import optimizer as optim_lib
from bgpo_jax.train import state as state_lib
from bgpo_jax.train import step as step_lib

# 2 micro-batches of 8 rows: one row per device on (8, 1, 1) and (1, 8, 1), so the sharded
# activation path (not a replicated fallback) is what the equality tests compare.
B, P, L, N, MICRO = 16, 4, 8, 2, 8


def model_cfg():
  return dataclasses.replace(llada.LLaDAConfig.preset("tiny"), n_layers=2)


def host_batch(cfg):
  """The global batch as NumPy (every process builds it identically, then keeps its rows)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.mask_token_id, size=(B, P + L)).astype(np.int32)
  attn = np.ones((B, P + L), np.int32)
  attn[:3, :1] = 0
  masks, weights = masking.sample_masks(jax.random.key(3), B, L, N)
  adv = rng.normal(size=(B,)).astype(np.float32)
  return {"tokens": tokens, "attention_mask": attn, "advantages": adv,
          "mc_masks": np.asarray(masks), "mc_weights": np.asarray(weights)}


def spec_list(spec, mesh):
  """A PartitionSpec as JSON: one entry per dimension (None, an axis name, or a list of names)."""
  dims = list(spec)
  return [list(d) if isinstance(d, tuple) else d for d in dims]


def run_step(mesh, batch_np, rows=None):
  cfg = model_cfg()
  c = base_config()
  c.optim.learning_rate = 1e-2
  optimizer = optim_lib.make_optimizer(c.optim, total_steps=10)
  schedule = optim_lib.make_schedule(c.optim, total_steps=10)
  params = llada.init_params(cfg, jax.random.key(7))  # same values everywhere, then sharded
  state, shardings = state_lib.create_train_state(cfg, optimizer, mesh, params=params)
  local = batch_np if rows is None else {k: (v[:, rows] if k in step_lib.BATCH_AXIS else v[rows])
                                         for k, v in batch_np.items()}
  batch = mesh_lib.host_batch_to_global(local, mesh, step_lib.BATCH_AXIS)
  scfg = step_lib.StepConfig(objective="bgpo", num_mc_samples=N, gen_length=L, micro_batch_size=MICRO)
  step = step_lib.jit_train_step(cfg, scfg, optimizer, schedule, mesh, shardings, batch)
  new_state, metrics = step(state, batch)
  leaves = jax.tree.leaves(new_state.params)
  # Checksums of the updated parameters (gathered to every host).
  sums = [float(jnp.sum(x.astype(jnp.float32))) for x in leaves]
  abs_sums = [float(jnp.sum(jnp.abs(x.astype(jnp.float32)))) for x in leaves]
  specs = jax.tree.map(lambda s: spec_list(s.spec, s.mesh), shardings.params)
  actual = jax.tree.map(lambda x: spec_list(x.sharding.spec, x.sharding.mesh), new_state.params)
  return {"loss": float(metrics["train/loss"]), "grad_norm": float(metrics["train/grad_norm"]),
          "sums": sums, "abs_sums": abs_sums, "specs": specs, "actual_specs": actual}


def fsdp_memory() -> dict:
  """temp bytes and dot output shapes of one compiled BGPO step (tiny model, 1 layer, 8 rows of
  32 + 96 tokens in one micro-batch, n = 2) on one device and on the (1, 8, 1) FSDP mesh."""
  from bgpo_jax.benchmarks import memory as mem_lib  # noqa: PLC0415 (heavy import, this mode only)
  cfg = dataclasses.replace(llada.LLaDAConfig.preset("tiny"), n_layers=1)
  rows, prompt, gen = 8, 32, 96
  out = {"global_tokens": rows * (prompt + gen)}
  for name, mesh in (("single", mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])),
                     ("fsdp", mesh_lib.make_mesh((1, 8, 1)))):
    compiled, _ = mem_lib.compile_step(cfg, "bgpo", N, mesh, batch=rows, micro_batch=rows,
                                       prompt_len=prompt, gen_length=gen)
    dots = re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} dot\(", compiled.as_text())
    out[name] = {"temp_bytes": step_lib.memory_report(compiled)["temp_bytes"],
                 "dot_shapes": sorted({tuple(int(d) for d in s.split(",") if d) for s in dots})}
  return out


def splash_steps() -> dict:
  """The BGPO step with splash attention on the (2, 2, 2) mesh: run with the kernel interpreted
  (its loss against the bmm attention's), and lowered for a TPU with the real Mosaic kernel
  (which XLA cannot partition: it must sit in a shard_map). Sequence 112: padded to the kernel's
  128-position block."""
  cfg = dataclasses.replace(llada.LLaDAConfig.preset("tiny"), n_layers=2, d_model=256, n_heads=2,
                            n_kv_heads=2, remat_policy="activations")
  mesh = mesh_lib.make_mesh((2, 2, 2))
  rng = np.random.default_rng(1)
  prompt, gen = 80, 32
  tokens = rng.integers(3, cfg.vocab_size, size=(8, prompt + gen)).astype(np.int32)
  attn = np.ones_like(tokens)
  attn[:3, :20] = 0
  masks, weights = masking.sample_masks(jax.random.key(4), 8, gen, N)
  batch_np = {"tokens": tokens, "attention_mask": attn, "advantages": rng.normal(size=(8,)).astype(np.float32),
              "mc_masks": np.asarray(masks), "mc_weights": np.asarray(weights)}
  c = base_config()
  optimizer = optim_lib.make_optimizer(c.optim, total_steps=10)
  schedule = optim_lib.make_schedule(c.optim, total_steps=10)
  scfg = step_lib.StepConfig(objective="bgpo", num_mc_samples=N, gen_length=gen, micro_batch_size=8)
  out = {}

  def step_for(impl, dtype):
    mcfg = dataclasses.replace(cfg, attention_impl=impl, compute_dtype=dtype)
    state, shardings = state_lib.create_train_state(mcfg, optimizer, mesh,
                                                    params=llada.init_params(mcfg, jax.random.key(7)))
    batch = mesh_lib.host_batch_to_global(batch_np, mesh, step_lib.BATCH_AXIS)
    return step_lib.jit_train_step(mcfg, scfg, optimizer, schedule, mesh, shardings, batch), state, batch, mcfg

  for impl in ("bmm", "splash"):
    step, state, batch, _ = step_for(impl, "float32")
    out[f"{impl}_loss"] = float(step(state, batch)[1]["train/loss"])
  step, state, batch, mcfg = step_for("splash", "bfloat16")
  # The task configs' rollout sampler (dual cache) runs the kernel in its prefill, under the mesh.
  settings = sampler.SamplerSettings(gen_length=gen, steps=gen, block_length=gen, temperature=0.0,
                                     cache="dual")
  gen_fn = jax.jit(lambda p, t, m, r: sampler.generate(mcfg, p, t, m, settings, r))
  prompts = jax.device_put(tokens[:, :prompt], batch["tokens"].sharding)
  pmask = jax.device_put(attn[:, :prompt], batch["tokens"].sharding)
  lowerings = {"step": lambda: step.trace(state, batch),
               "sampler": lambda: gen_fn.trace(state.params, prompts, pmask, jax.random.key(0))}
  attention.SPLASH_INTERPRET = False  # trace the real Mosaic kernel (lowered only, never run here)
  try:
    for name, trace in lowerings.items():
      try:
        with jax.set_mesh(mesh):
          text = trace().lower(lowering_platforms=("tpu",)).as_text()
        out[f"{name}_tpu_custom_calls"] = text.count("tpu_custom_call")
      except Exception as e:  # noqa: BLE001 (reported to the test)
        out[f"{name}_tpu_error"] = f"{type(e).__name__}: {e}"[:500]
  finally:
    attention.SPLASH_INTERPRET = None
  return out


def main():
  mode = sys.argv[1]
  if mode == "meshes":
    assert jax.device_count() == 8, jax.devices()
    batch = host_batch(model_cfg())
    out = {"single": run_step(mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]), batch)}
    for shape in ((8, 1, 1), (1, 8, 1), (2, 2, 2)):
      out[str(shape)] = run_step(mesh_lib.make_mesh(shape), batch)
    out["fsdp_memory"] = fsdp_memory()
    out["splash"] = splash_steps()
    print("RESULT " + json.dumps(out))
  elif mode == "distributed":
    pid, nproc, port = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    batch = host_batch(model_cfg())
    per = B // nproc
    rows = np.arange(pid * per, (pid + 1) * per)
    out = run_step(mesh_lib.make_mesh((-1, 1, 1)), batch, rows)
    out["process_count"] = jax.process_count()
    print("RESULT " + json.dumps(out))
    jax.distributed.shutdown()
  else:
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
  main()
