"""Sampler throughput: tokens/s of `generate` and its overhead over bare forwards.

generate runs as the rollout does: from the model config, so hidden states from the model and
the vocab head on the current block only. The floor is a jitted `lax.fori_loop` of `steps` bare forwards of the same
shape with the head on the current block, each writing its argmax back so XLA cannot hoist it.
fullhead_s: generate from a logits function with the head on all response positions every step,
for comparison.
overhead = generate time / floor time - 1 (target: < 10%). The programs are timed round-robin
and the fastest run of each is kept (robust to a shared, loaded machine).

  python -m bgpo_jax.benchmarks.sampler [--models tiny,small] [--out FILE]

On a CPU the default shrinks "small" (batch 1, 16 steps) to keep the run to a few minutes; pass
--small-batch / --small-steps to override (the overhead ratio is per step, so it still reads).

--caches: the cached samplers instead (SPEC section 4b, `sampler.generate` with settings.cache):
none / prefix / dual, each on the fixed schedule and (with --threshold) with threshold decoding, at every
--gen-lengths value, block --block-length and steps = gen_length * --steps-ratio, timed
round-robin like the rest. Models: tiny, "small8" (d_model 512, 8 layers, 8 heads, MLP 1536,
vocab 32000) or any preset. Columns: seconds, tokens/s, model calls (nfe), MFU (model FLOPs of
the calls actually made), speedup over the uncached fixed-schedule sampler of the same length.

  python -m bgpo_jax.benchmarks.sampler --caches [--models tiny,small8] [--gen-lengths 256,512]
      [--families llada,dream]

--torch-python PY --fast-dllm DIR: the cached samplers against Fast-dLLM's own (DIR: a checkout of
NVlabs/Fast-dLLM; llada/generate.py's generate_with_prefix_cache / generate_with_dual_cache on its
llada/model/ code), on our random weights (--models, first of --gen-lengths, block --block-length,
steps = gen * --steps-ratio, --cache-batch prompt rows: ours in one call, Fast-dLLM's one call
per row as its samplers take one row; no padding), timed
round-robin in one run with tokens compared at temperature 0 (benchmarks/official.py). With
--llada-modeling DIR --llada-generate FILE also the uncached sampler against the official
generate() (64 tokens, 64 steps, blocks of 32).

  python -m bgpo_jax.benchmarks.sampler --models m30 --torch-python /tmp/torchvenv/bin/python \
      --fast-dllm FAST_DLLM [--llada-modeling DIR --llada-generate FILE]

--families: the same presets of each family (Dream: QKV biases, its own GQA; its cached window
runs one position more, models/dream_cache.py, which the FLOP count leaves out).
"""

from __future__ import annotations

import argparse

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


def bench_model(name: str, *, batch: int, plen: int, gen_length: int, block_length: int,
                steps: int, temperature: float, repeats: int, peak: float) -> dict:
  config = llada.LLaDAConfig.preset(name)
  params = family.module_for(config).init_params(config, jax.random.key(0))
  r = jax.random.randint(jax.random.key(1), (batch, plen), 6, min(config.vocab_size, 120))
  toks = r.astype(jnp.int32)
  mask = jnp.ones((batch, plen), jnp.int32)

  settings = sampler.SamplerSettings(gen_length=gen_length, steps=steps,
                                     block_length=block_length, temperature=temperature)

  def make_gen(block_head: bool):
    @jax.jit
    def gen(params, toks, mask, rng):
      if block_head:  # the rollout's path: head on the current block only
        return sampler.generate(config, params, toks, mask, settings, rng)
      # logits for the whole response every step
      hidden, head = _hidden_fn(config, params), _head_fn(config, params)
      return sampler.generate(lambda t, a: head(hidden(t, a)[:, -gen_length:]), None, toks, mask,
                              settings, rng, ids=sampler.TokenIds.of(config))
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
  tg, tf, tfull = common.interleaved([(make_gen(True), args), (floor, args[:3]),
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


# d_model 512, 8 layers: the "small-class" model (57M parameters, 25M without embeddings).
_EXTRA_MODELS = {"small8": ("small", dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
                                          mlp_hidden_size=1536))}


def _model_config(name: str, fam: str = "llada"):
  """A preset (or small8, or benchmarks.forward's m30 / m1b) of the family `fam` (models/family.py)."""
  from bgpo_jax.benchmarks.forward import preset_parts
  base, over = _EXTRA_MODELS.get(name) or preset_parts(name, fam)
  return family.preset(fam, base, **over)


def window_flops(config: llada.LLaDAConfig, batch: int, width: int, keys: int,
                 block_length: int) -> float:
  """Model FLOPs of one cached call: `width` query positions over `keys` keys (layers and
  attention), the vocab head on one block."""
  n = config.num_params(embeddings=False)
  return (2.0 * n * batch * width + 4.0 * batch * width * keys * config.d_model * config.n_layers
          + 2.0 * config.d_model * config.embedding_size * batch * block_length)


def cached_flops(config, cache: str, batch: int, plen: int, gen_length: int, block_length: int,
                 steps: int, nfe: int) -> float:
  """Model FLOPs of a cached generate call of `nfe` model calls (each block: one full forward,
  the rest windows; the calls of a threshold run are spread evenly over the blocks)."""
  S = plen + gen_length
  nb = gen_length // block_length
  per_block = nfe / nb
  total = 0.0
  for b in range(nb):
    s = plen + b * block_length
    width = {"none": S, "prefix": S - s, "dual": block_length}[cache]
    total += window_flops(config, batch, S, S, block_length)
    total += (per_block - 1) * window_flops(config, batch, width, S, block_length)
  return total


def bench_caches(name: str, *, batch: int, plen: int, gen_length: int, block_length: int,
                 steps: int, temperature: float, threshold: float | None, repeats: int,
                 peak: float, fam: str = "llada", caches: tuple = sampler.CACHES) -> list[dict]:
  config = _model_config(name, fam)
  params = family.module_for(config).init_params(config, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (batch, plen), 6, min(config.vocab_size, 120))
  toks = toks.astype(jnp.int32)
  mask = jnp.ones((batch, plen), jnp.int32).at[0, : plen // 4].set(0)  # one left-padded row
  runs = [(c, None) for c in caches]
  if threshold is not None:
    runs += [(c, threshold) for c in caches]

  def make(cache, thr):
    settings = sampler.SamplerSettings(gen_length=gen_length, steps=steps,
                                       block_length=block_length, temperature=temperature,
                                       cache=cache, threshold=thr)

    @jax.jit
    def gen(params, toks, mask, rng):
      return sampler.generate(config, params, toks, mask, settings, rng, return_nfe=True)
    return gen

  args = (params, toks, mask, jax.random.key(2))
  fns = [make(c, t) for c, t in runs]
  timed = common.interleaved([(f, args) for f in fns], repeats)
  nfes = [int(f(*args)[1]) for f in fns]
  # The speedup is over the uncached fixed-schedule sampler when it was timed, else over the first row.
  base = timed[0]["step_s"]
  rows = []
  for (cache, thr), rec, nfe in zip(runs, timed, nfes):
    flops = cached_flops(config, cache, batch, plen, gen_length, block_length, steps, nfe)
    rows.append({
        "family": fam, "model": name, "params_M": config.num_params() / 1e6, "batch": batch, "prompt": plen,
        "gen": gen_length, "block": block_length, "steps": steps, "cache": cache,
        "threshold": "-" if thr is None else thr, "nfe": nfe, "gen_s": rec["step_s"],
        "tok/s": batch * gen_length / rec["step_s"], "MFU_%": 100.0 * flops / rec["step_s"] / peak,
        "speedup": base / rec["step_s"], "compile_s": rec["compile_s"],
    })
  return rows


def main_caches(args, peak: float) -> list[dict]:
  rows = []
  for name in args.models.split(","):
    for gen_length in (int(g) for g in args.gen_lengths.split(",")):
      for fam in args.families.split(","):
        steps = max(gen_length // args.block_length, int(gen_length * args.steps_ratio))
        rows += bench_caches(name, batch=args.batch, plen=args.prompt_len, gen_length=gen_length,
                             block_length=args.block_length, steps=steps,
                             temperature=args.temperature, threshold=args.threshold,
                             repeats=args.repeats, peak=peak, fam=fam,
                             caches=tuple(args.cache_modes.split(",")))
  common.print_table(rows, ["family", "model", "params_M", "batch", "prompt", "gen", "block", "steps",
                            "cache", "threshold", "nfe", "gen_s", "tok/s", "MFU_%", "speedup",
                            "compile_s"],
                     title=f"cached sampler ({common.device_description()}; fp32 matmul peak "
                           f"{peak / 1e9:.1f} GFLOP/s)")
  return rows


def main_official(args) -> list[dict]:
  """The cached (and with --llada-generate the uncached) sampler against the peers' own code."""
  from bgpo_jax.benchmarks import forward, official
  if not args.torch_python:
    raise SystemExit("--fast-dllm / --llada-generate need --torch-python (an interpreter with torch)")
  name = args.models.split(",")[0]
  config = (forward.make_config(name, compute_dtype="float32", param_dtype="float32") if name == "m30"
            else _model_config(name))
  g = int(args.gen_lengths.split(",")[0])
  steps = max(g // args.block_length, int(g * args.steps_ratio))
  rows = official.compare(config, torch_python=args.torch_python, llada_modeling=args.llada_modeling,
                          llada_generate=args.llada_generate, fast_dllm=args.fast_dllm, forward_rows=False,
                          gen=(64, 64, 32) if g >= 64 else (g, g, args.block_length),
                          cache_gen=(g, steps, args.block_length), prompt_len=args.prompt_len,
                          repeats=args.repeats, cache_batch=args.cache_batch)
  official.print_rows(rows)
  common.write_json(args.out, rows, meta={"device": common.device_description(), "args": vars(args)})
  return rows


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
  ap.add_argument("--caches", action="store_true", help="benchmark none / prefix / dual caches")
  ap.add_argument("--gen-lengths", default="256,512", help="--caches: response lengths")
  ap.add_argument("--steps-ratio", type=float, default=0.5, help="--caches: steps / gen_length")
  ap.add_argument("--threshold", type=float, default=None,
                  help="--caches: also time threshold decoding at this threshold")
  ap.add_argument("--cache-modes", default=",".join(sampler.CACHES),
                  help="--caches: which of none,prefix,dual to time (the GPU row: dual)")
  ap.add_argument("--families", default="llada",
                  help="--caches: model families (models/family.py), e.g. llada,dream")
  ap.add_argument("--torch-python", default=None, help="an interpreter with torch (the peers' rows)")
  ap.add_argument("--fast-dllm", default=None, metavar="DIR",
                  help="a Fast-dLLM checkout: compare the prefix / dual caches with its own samplers")
  ap.add_argument("--llada-modeling", default=None, metavar="DIR",
                  help="with --llada-generate: the official modeling code for the uncached row")
  ap.add_argument("--llada-generate", default=None, metavar="FILE",
                  help="ML-GSAI/LLaDA's generate.py: also compare the uncached sampler with it")
  ap.add_argument("--cache-batch", type=int, default=1,
                  help="--fast-dllm: prompt rows of the cached rows (ours in one call, Fast-dLLM one call per row)")
  args = ap.parse_args(argv)
  if args.fast_dllm or args.llada_generate:
    return main_official(args)

  on_cpu = jax.devices()[0].platform == "cpu"
  peak = common.matmul_peak_flops(jnp.float32)
  if args.caches:
    rows = main_caches(args, peak)
    common.write_json(args.out, rows, meta={"device": common.device_description(),
                                            "peak_flops": peak, "args": vars(args)})
    return rows
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
