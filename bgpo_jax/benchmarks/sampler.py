"""Sampler throughput: tokens/s of `generate` and its overhead over bare forwards.

generate runs as the rollout does: hidden states from the model, the vocab head on the current
block only (`head_fn`). The floor is a jitted `lax.fori_loop` of `steps` bare forwards of the same
shape with the head on the current block, each writing its argmax back so XLA cannot hoist it.
fullhead_s: generate with the head on all response positions every step, for comparison.
overhead = generate time / floor time - 1 (target: < 10%). The programs are timed round-robin
and the fastest run of each is kept (robust to a shared, loaded machine).

  python -m bgpo_jax.benchmarks.sampler [--models tiny,small] [--out FILE]

On a CPU the default shrinks "small" (batch 1, 16 steps) to keep the run to a few minutes; pass
--small-batch / --small-steps to override (the overhead ratio is per step, so it still reads).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from jax import lax

from bgpo_jax.benchmarks import common
from bgpo_jax.diffusion import sampler
from bgpo_jax.models import family, llada


def _hidden_fn(config, params):
  return lambda tokens, attn: family.module_for(config).hidden_states(config, params, tokens, attn)


def _head_fn(config, params):
  return lambda hidden: family.module_for(config).lm_head(config, params, hidden)


def step_flops(config: llada.LLaDAConfig, batch: int, plen: int, gen_length: int,
               block_length: int) -> float:
  """One sampler step's model FLOPs: the forward with the vocab head on one block only."""
  full = family.module_for(config).forward_flops(config, batch, plen + gen_length)
  head = 2.0 * config.d_model * config.embedding_size * batch
  return full - head * (plen + gen_length - block_length)


def _interleaved(calls: list, repeats: int) -> list[dict]:
  """Times jitted calls [(fn, args), ...] round-robin and keeps each one's fastest run: on a
  shared machine, load swings hit all alike and the minimum is the least disturbed."""
  out = []
  for f, a in calls:
    t0 = time.perf_counter()
    common.block(f(*a))
    out.append({"first_s": time.perf_counter() - t0, "all_s": []})
  for _ in range(repeats):
    for (f, a), rec in zip(calls, out):
      t0 = time.perf_counter()
      common.block(f(*a))
      rec["all_s"].append(time.perf_counter() - t0)
  for rec in out:
    rec["step_s"] = min(rec["all_s"])
    rec["compile_s"] = max(rec["first_s"] - rec["step_s"], 0.0)
  return out


def bench_model(name: str, *, batch: int, plen: int, gen_length: int, block_length: int,
                steps: int, temperature: float, repeats: int, peak: float) -> dict:
  config = llada.LLaDAConfig.preset(name)
  params = family.module_for(config).init_params(config, jax.random.key(0))
  r = jax.random.randint(jax.random.key(1), (batch, plen), 6, min(config.vocab_size, 120))
  toks = r.astype(jnp.int32)
  mask = jnp.ones((batch, plen), jnp.int32)

  def make_gen(block_head: bool):
    @jax.jit
    def gen(params, toks, mask, rng):
      hidden, head = _hidden_fn(config, params), _head_fn(config, params)
      if block_head:  # the rollout's path: head on the current block only
        fn, head_fn = hidden, head
      else:  # logits for the whole response every step
        fn, head_fn = (lambda t, a: head(hidden(t, a)[:, -gen_length:])), None
      return sampler.generate(fn, toks, mask, rng=rng, gen_length=gen_length, steps=steps,
                              block_length=block_length, temperature=temperature,
                              mask_id=config.mask_token_id, head_fn=head_fn)
    return gen

  @jax.jit
  def floor(params, toks, mask):
    hidden, head = _hidden_fn(config, params), _head_fn(config, params)
    canvas = jnp.concatenate(
        [toks, jnp.full((batch, gen_length), config.mask_token_id, jnp.int32)], 1)
    attn = jnp.concatenate([mask, jnp.ones((batch, gen_length), jnp.int32)], 1)
    spb = steps // (gen_length // block_length)

    def body(i, canvas):
      # Bare forward + head on the current block, written back (the least any sampler does
      # with the logits; also keeps XLA from hoisting the forward out of the loop).
      start = plen + (i // spb) * block_length
      logits = head(lax.dynamic_slice_in_dim(hidden(canvas, attn), start, block_length, axis=1))
      return lax.dynamic_update_slice_in_dim(
          canvas, jnp.argmax(logits, -1).astype(jnp.int32), start, axis=1)

    return lax.fori_loop(0, steps, body, canvas)

  args = (params, toks, mask, jax.random.key(2))
  tg, tf, tfull = _interleaved([(make_gen(True), args), (floor, args[:3]),
                                (make_gen(False), args)], repeats)
  flops = steps * step_flops(config, batch, plen, gen_length, block_length)
  return {
      "model": name,
      "params_M": config.num_params() / 1e6,
      "batch": batch,
      "prompt": plen,
      "gen": gen_length,
      "block": block_length,
      "steps": steps,
      "gen_s": tg["step_s"],
      "floor_s": tf["step_s"],
      "overhead_%": 100.0 * (tg["step_s"] / tf["step_s"] - 1.0),
      "fullhead_s": tfull["step_s"],
      "tok/s": batch * gen_length / tg["step_s"],
      "MFU_%": 100.0 * flops / tg["step_s"] / peak,
      "compile_s": tg["compile_s"],
  }


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="tiny,small")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--gen-length", type=int, default=256)
  ap.add_argument("--block-length", type=int, default=32)
  ap.add_argument("--steps", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.6)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--small-batch", type=int, default=None, help="default: 1 on CPU, else --batch")
  ap.add_argument("--small-steps", type=int, default=None, help="default: 16 on CPU, else --steps")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)

  on_cpu = jax.devices()[0].platform == "cpu"
  peak = common.matmul_peak_flops(jnp.float32)
  rows = []
  for name in args.models.split(","):
    batch, steps, repeats = args.batch, args.steps, args.repeats
    if name != "tiny":
      batch = args.small_batch or (1 if on_cpu else args.batch)
      steps = args.small_steps or (16 if on_cpu else args.steps)
      repeats = min(repeats, 2) if on_cpu else repeats
    rows.append(bench_model(name, batch=batch, plen=args.prompt_len, gen_length=args.gen_length,
                            block_length=args.block_length, steps=steps,
                            temperature=args.temperature, repeats=repeats, peak=peak))
  common.print_table(rows, ["model", "params_M", "batch", "prompt", "gen", "block", "steps",
                            "gen_s", "floor_s", "overhead_%", "fullhead_s", "tok/s", "MFU_%", "compile_s"],
                     title=f"sampler ({common.device_description()}; fp32 matmul peak "
                           f"{peak / 1e9:.1f} GFLOP/s)")
  common.write_json(args.out, rows, meta={"device": common.device_description(),
                                          "peak_flops": peak, "args": vars(args)})
  return rows


if __name__ == "__main__":
  main()
