"""Sampler throughput: tokens/s of `generate` and its overhead over bare forwards.

The floor is a jitted `lax.fori_loop` of `steps` forwards of the same shape and the same logits
function (vocab head on the response positions only), each depending on the previous one so XLA
cannot hoist it. overhead = generate time / floor time - 1 (target: < 10%).

  python -m bgpo_jax.benchmarks.sampler [--models tiny,small] [--out FILE]

On a CPU the default shrinks "small" (batch 1, 16 steps) to keep the run to a few minutes; pass
--small-batch / --small-steps to override (the overhead ratio is per step, so it still reads).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
from jax import lax

from bgpo_jax.benchmarks import common
from bgpo_jax.diffusion import sampler
from bgpo_jax.models import llada


def _logits_fn(config, params, gen_length):
  def fn(tokens, attention_mask):
    hidden = llada.hidden_states(config, params, tokens, attention_mask)[:, -gen_length:]
    return llada.lm_head(config, params, hidden)
  return fn


def step_flops(config: llada.LLaDAConfig, batch: int, plen: int, gen_length: int) -> float:
  """One sampler step's model FLOPs: the forward without the vocab head on the prompt."""
  full = llada.forward_flops(config, batch, plen + gen_length)
  return full - 2.0 * batch * plen * config.d_model * config.embedding_size


def bench_model(name: str, *, batch: int, plen: int, gen_length: int, block_length: int,
                steps: int, temperature: float, repeats: int, peak: float) -> dict:
  config = llada.LLaDAConfig.preset(name)
  params = llada.init_params(config, jax.random.key(0))
  r = jax.random.randint(jax.random.key(1), (batch, plen), 6, min(config.vocab_size, 120))
  toks = r.astype(jnp.int32)
  mask = jnp.ones((batch, plen), jnp.int32)

  @jax.jit
  def gen(params, toks, mask, rng):
    return sampler.generate(_logits_fn(config, params, gen_length), toks, mask, rng=rng,
                            gen_length=gen_length, steps=steps, block_length=block_length,
                            temperature=temperature, mask_id=config.mask_token_id)

  @jax.jit
  def floor(params, toks, mask):
    fn = _logits_fn(config, params, gen_length)
    canvas = jnp.concatenate(
        [toks, jnp.full((batch, gen_length), config.mask_token_id, jnp.int32)], 1)
    attn = jnp.concatenate([mask, jnp.ones((batch, gen_length), jnp.int32)], 1)

    def body(i, canvas):
      logits = fn(canvas, attn)
      # A one-token dependency on the logits keeps the forward inside the loop.
      return canvas.at[:, -1].set(jnp.argmax(logits[:, -1], -1).astype(jnp.int32))

    return lax.fori_loop(0, steps, body, canvas)

  tg = common.time_jitted(gen, params, toks, mask, jax.random.key(2), repeats=repeats)
  tf = common.time_jitted(floor, params, toks, mask, repeats=repeats)
  flops = steps * step_flops(config, batch, plen, gen_length)
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
                            "gen_s", "floor_s", "overhead_%", "tok/s", "MFU_%", "compile_s"],
                     title=f"sampler ({common.device_description()}; fp32 matmul peak "
                           f"{peak / 1e9:.1f} GFLOP/s)")
  common.write_json(args.out, rows, meta={"device": common.device_description(),
                                          "peak_flops": peak, "args": vars(args)})
  return rows


if __name__ == "__main__":
  main()
