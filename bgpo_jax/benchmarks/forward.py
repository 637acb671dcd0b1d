"""Forward throughput and MFU of a model family (LLaDA by default; --family llada,dream side by side).

  python -m bgpo_jax.benchmarks.forward                      # "small" on CPU, float32 + bfloat16
  python -m bgpo_jax.benchmarks.forward --preset llada_8b --batch 8 --seq 1024 --dtypes bfloat16

Model FLOPs of one forward (llada.forward_flops): 2 * params * tokens, counting every matmul
weight (blocks + output head; the input embedding is a lookup, not a matmul), plus attention
4 * S^2 * d_model per layer per sequence (scores and context). MFU divides the achieved FLOP/s
by the measured matmul peak of the same dtype (benchmarks.common.matmul_peak_flops).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bgpo_jax.benchmarks import common
from bgpo_jax.models import family, llada


def bench_one(preset: str, compute_dtype: str, param_dtype: str | None, batch: int, seq: int,
              repeats: int, attention_impl: str, pad: int, family_name: str = "llada") -> dict:
  config = family.preset(family_name, preset, compute_dtype=compute_dtype,
                         param_dtype=param_dtype or compute_dtype,
                         attention_impl=attention_impl)
  params = family.module_for(config).init_params(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, seq)), jnp.int32)
  mask = np.ones((batch, seq), np.int32)
  mask[:, :pad] = 0  # left padding, as for prompts
  fwd = jax.jit(functools.partial(family.module_for(config).forward, config))
  t = common.time_jitted(fwd, params, tokens, jnp.asarray(mask), repeats=repeats)
  flops = family.module_for(config).forward_flops(config, batch, seq)
  peak = common.matmul_peak_flops(config.compute_jnp_dtype)
  achieved = flops / t["step_s"]
  del params
  return {
    "family": family_name, "preset": preset, "compute": compute_dtype, "params_dtype": config.param_dtype,
    "attn": attention_impl, "batch": batch, "seq": seq,
    "params_M": config.num_params() / 1e6,
    "compile_s": t["compile_s"], "step_ms": 1e3 * t["step_s"],
    "tokens_per_s": batch * seq / t["step_s"],
    "GFLOP": flops / 1e9, "TFLOP/s": achieved / 1e12, "peak_TFLOP/s": peak / 1e12,
    "MFU": achieved / peak,
  }


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="small", choices=["tiny", "small", "llada_8b", "dream_7b"])
  ap.add_argument("--family", default="llada", help="model families, comma separated (llada,dream: side by side)")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--pad", type=int, default=0, help="left-padded positions per row")
  ap.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes, comma separated")
  ap.add_argument("--param-dtype", default=None, help="default: the compute dtype")
  ap.add_argument("--attention-impl", default="xla", choices=list(llada.ATTENTION_IMPLS))
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--rounds", type=int, default=1, help="repeat the whole comparison (interleaved) this often")
  ap.add_argument("--out", default=None, help="write the records as JSON")
  args = ap.parse_args(argv)

  rows = [bench_one(args.preset, dt, args.param_dtype, args.batch, args.seq, args.repeats,
                    args.attention_impl, args.pad, fam)
          for _ in range(args.rounds) for fam in args.family.split(",") for dt in args.dtypes.split(",")]
  common.print_table(rows, ["family", "preset", "compute", "params_dtype", "attn", "batch", "seq",
                            "compile_s", "step_ms", "tokens_per_s", "TFLOP/s", "peak_TFLOP/s",
                            "MFU"],
                     title=f"{args.family} forward on {common.device_description()}")
  common.write_json(args.out, rows, meta={"device": common.device_description(), "args": vars(args)})
  return rows


if __name__ == "__main__":
  main()
