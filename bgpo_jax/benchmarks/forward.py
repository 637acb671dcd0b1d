"""LLaDA forward and forward + backward throughput, MFU, and a side-by-side with PyTorch.

  python -m bgpo_jax.benchmarks.forward                      # the m30 model, see below
  python -m bgpo_jax.benchmarks.forward --torch-python /path/to/venv/bin/python --sampler
  python -m bgpo_jax.benchmarks.forward --preset small --batch 4 --seq 256 --dtypes float32,bfloat16
  python -m bgpo_jax.benchmarks.forward --preset llada_8b --batch 8 --seq 1024 --dtypes bfloat16
  python -m bgpo_jax.benchmarks.forward --preset m1b --batch 8 --seq 1024 --dtypes bfloat16 \
      --impls auto,bmm --repeats 5                  # a GPU: ~1.3B LLaDA, cuDNN flash vs bmm

Default model ("m30": d_model 512, 8 layers, 8 heads, MLP 1408, vocab 4096, 30M params), float32,
4 x 512 tokens (16 left-padded keys per row). Rows per attention implementation in --impls
(default "xla,auto": the original grouped einsum and today's default, timed round-robin in one
process, each keeping its fastest run, so a shared machine's load hits both alike):
  fwd     llada.forward (all positions, full-vocabulary head);
  fwd+bwd jax.value_and_grad of one masked-diffusion ELBO term (diffusion.elbo.elbo_term: the
          last 256 positions are the response, half of them masked, weight 1/t = 2), as a
          train step computes it (the head on the response positions only).

Model FLOPs of one forward (llada.forward_flops): 2 * params * tokens (blocks + head; the input
embedding is a lookup) + attention 4 * S^2 * d_model per layer per sequence; forward + backward
counts 3x that (the head over the whole sequence, although the ELBO needs it on 256 positions
only). MFU = achieved FLOP/s / the matmul peak measured in the same run
(common.matmul_peak_flops: the fastest of 25 runs of a 1024^3 matmul, before and after the rows);
with --torch-python, MFU_best is against the faster of XLA's and torch's own such peak (MKL's
GEMM ran 15-20% above XLA:CPU's on a 2-core Xeon with AVX-512).

--torch-python PY --llada-modeling DIR [--llada-generate FILE]: the comparison with the official
code (benchmarks/official.py): DIR holds the official modeling_llada.py + configuration_llada.py
(as released with LLaDA-8B-Instruct), FILE is ML-GSAI/LLaDA's generate.py. The torch side loads
our random weights from a float32 checkpoint (hf.save) and its calls are timed round-robin with
ours in one run: forward, forward + backward of the ELBO loss (ours as the trainer computes it,
"elbo", and written inline over hidden_states + lm_head, "plain"; theirs: the official forward,
its head over all positions, then log_softmax at the response positions), and, with FILE, the
uncached sampler (batch 1, 64-token prompt, --gen-official lengths) with tokens compared. Only
these rows are timed then. torch is never a dependency; install it in a separate venv.
--torch-python PY alone (the fallback): runs benchmarks/torch_llada.py, an independent PyTorch
re-implementation of the official modeling math, right after the JAX rows (not round-robin),
with OMP_WAIT_POLICY=PASSIVE unless set (spinning OpenMP threads cost torch 10x+ on a shared CPU).
--baseline FILE: a llada.py of an earlier commit (`git show adb71ea:bgpo_jax/models/llada.py >
FILE`) timed round-robin next to today's model, forward and forward + backward of the same inline
ELBO loss (before / after in one process).
--pieces: instead, one layer's pieces in isolation (MLP, projections + RoPE, attention core,
block, and the ELBO step / n_layers), forward vs forward + backward, round-robin: where the
backward's time goes.
--sampler: also times the uncached sampler as the rollouts call it (diffusion.sampler.generate,
head on the current block) against the torch script's reference generate() loop, batch 1,
64-token prompt, 64 tokens in 64 steps, one block.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bgpo_jax.benchmarks import common
from bgpo_jax.diffusion import elbo
from bgpo_jax.diffusion import sampler as sampler_lib
from bgpo_jax.models import family, llada

# m30: a ~30M-parameter LLaDA that a 2-core CPU trains in seconds a step (tiny's special ids,
# so the char tokenizer's mask id 2).
M30 = dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, mlp_hidden_size=1408,
           vocab_size=4096, embedding_size=4096, max_sequence_length=1024)
# m1b, the GPU model: the full-size preset's layout, vocabulary and special ids at ~1.3B
# parameters (LLaDA: 0.82B in the blocks, 0.52B in the embedding and head), bfloat16.
M1B = dict(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, mlp_hidden_size=5632)
_FULL_SIZE = {"llada": "llada_8b", "dream": "dream_7b"}


def preset_parts(preset: str, family_name: str = "llada") -> tuple[str, dict]:
  """(the family's preset name, its overrides) behind one of this benchmark's --preset names."""
  if preset == "m30":  # the m30 shapes on either family's tiny preset
    return "tiny", M30
  if preset == "m1b":
    return _FULL_SIZE[family.family_of(family_name)], M1B
  return preset, {}


def make_config(preset: str, family_name: str = "llada", **knobs):
  name, overrides = preset_parts(preset, family_name)
  return family.preset(family_name, name, **overrides, **knobs)


def elbo_inputs(config: llada.LLaDAConfig, batch: int, seq: int, pad: int, resp: int):
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(6, config.vocab_size, (batch, seq)), jnp.int32)
  mask = np.ones((batch, seq), np.int32)
  mask[:, :pad] = 0  # left padding, as for prompts
  masked = jnp.asarray(rng.random((batch, resp)) < 0.5)
  return tokens, jnp.asarray(mask), masked, jnp.full((batch,), 2.0, jnp.float32)


def bench_impls(preset: str, compute_dtype: str, param_dtype: str | None, batch: int, seq: int,
                resp: int, repeats: int, impls: list[str], pad: int, fwd_bwd: bool,
                peak: float, family_name: str = "llada") -> list[dict]:
  base = make_config(preset, family_name, compute_dtype=compute_dtype, param_dtype=param_dtype or compute_dtype)
  model = family.module_for(base)
  params = model.init_params(base, jax.random.key(0))
  tokens, attn, masked, weight = elbo_inputs(base, batch, seq, pad, resp)
  calls, names = [], []
  for impl in impls:
    config = dataclasses.replace(base, attention_impl=impl)
    calls.append((jax.jit(functools.partial(model.forward, config)), (params, tokens, attn)))
    names.append((impl, "fwd"))
    if fwd_bwd:
      loss = lambda p, c=config: -jnp.sum(elbo.elbo_term(c, p, tokens, attn, masked, weight))  # noqa: E731
      calls.append((jax.jit(jax.value_and_grad(loss)), (params,)))
      names.append((impl, "fwd+bwd"))
  times = common.interleaved(calls, repeats)
  flops = model.forward_flops(base, batch, seq)
  rows = []
  for (impl, kind), t in zip(names, times):
    f = flops * (3 if kind == "fwd+bwd" else 1)
    rows.append({
      "impl": "jax " + (f"{impl}={llada.attention_impl_for(dataclasses.replace(base, attention_impl=impl))}"
                        if impl == "auto" else impl),
      "pass": kind, "family": family_name, "preset": preset, "compute": compute_dtype, "batch": batch, "seq": seq,
      "params_M": base.num_params() / 1e6, "compile_s": t["compile_s"], "step_s": t["step_s"],
      "tokens_per_s": batch * seq / t["step_s"], "GFLOP": f / 1e9, "TFLOP/s": f / t["step_s"] / 1e12,
      "MFU": f / t["step_s"] / peak,
    })
  for r in rows:  # forward + backward over forward, per implementation
    if r["pass"] == "fwd+bwd":
      fwd = next(x for x in rows if x["impl"] == r["impl"] and x["pass"] == "fwd")  # same family
      r["x_fwd"] = r["step_s"] / fwd["step_s"]
  return rows


def bench_pieces(preset: str, batch: int, seq: int, resp: int, pad: int, repeats: int) -> list[dict]:
  """One layer's pieces of the float32 LLaDA model in isolation, forward vs forward + backward
  (jax.vjp with a random cotangent, so nothing is simplified away), round-robin in one process:
  where the backward's time goes. "step / layer" is the ELBO step of the whole model divided by
  n_layers (the head, embedding and layer-scan overhead spread over the layers)."""
  c = make_config(preset, compute_dtype="float32", param_dtype="float32")
  B, S, D, H, KV, hd = batch, seq, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
  params = llada.init_params(c, jax.random.key(0))
  p0 = jax.tree.map(lambda a: a[0], params["blocks"])
  ks = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(ks[0], (B, S, D))
  cos, sin = llada.rope_tables(S, hd, c.rope_theta)
  key_mask = jnp.arange(S)[None, :] >= jnp.full((B, 1), pad)
  q, k = jax.random.normal(ks[1], (B, S, H, hd)), jax.random.normal(ks[2], (B, S, KV, hd))

  eps, f32 = c.rms_norm_eps, jnp.float32

  def mlp(p, x):  # as layers.block's second half
    gate, up = llada.norm_dense(x, p["ff_norm"], ((p["ff_proj"], None), (p["up_proj"], None)), eps, f32)
    return x + llada.swiglu_dense(gate.reshape(B, S, -1), up.reshape(B, S, -1), p["ff_out"])

  def proj(p, x):  # norm, q/k/v/out projections and RoPE, without the attention itself
    qq, kk, vv = llada.norm_dense(x, p["attn_norm"], tuple((p[f"{n}_proj"], None) for n in "qkv"), eps, f32)
    qq = llada.apply_rope(qq.reshape(B, S, H, hd), cos, sin)
    kk = llada.apply_rope(kk.reshape(B, S, KV, hd), cos, sin)
    vv = vv.reshape(B, S, KV, hd)
    ctx = qq * jnp.repeat(kk + vv, H // KV, axis=2)
    return x + llada.dense(ctx.reshape(B, S, H * hd), p["attn_out"])

  tokens, attn, masked, weight = elbo_inputs(c, batch, seq, pad, resp)
  step = lambda p: -jnp.sum(elbo.elbo_term(c, p, tokens, attn, masked, weight))  # noqa: E731
  pieces = {
    "mlp (norm + SwiGLU)": (mlp, (p0, x)),
    "projections + RoPE": (proj, (p0, x)),
    "attention core": (lambda q, k, v: llada.attention(c, q, k, v, key_mask), (q, k, k)),
    "block": (lambda p, x: llada._block(c, x, p, cos, sin, key_mask), (p0, x)),
  }
  calls, names = [], []
  for name, (f, args) in pieces.items():
    ct = jax.random.normal(ks[3], jax.eval_shape(f, *args).shape)
    calls += [(jax.jit(f), args), (jax.jit(lambda ct, *a, f=f: jax.vjp(f, *a)[1](ct)), (ct,) + args)]
    names += [(name, "fwd"), (name, "fwd+bwd")]
  calls += [(jax.jit(step), (params,)), (jax.jit(jax.value_and_grad(step)), (params,))]
  names += [("step / layer", "fwd"), ("step / layer", "fwd+bwd")]
  times = common.interleaved(calls, repeats)
  rows = []
  for (name, kind), t in zip(names, times):
    div = c.n_layers if name.startswith("step") else 1
    rows.append({"impl": f"jax {llada.attention_impl_for(c)}", "piece": name, "pass": kind, "preset": preset,
                 "batch": batch, "seq": seq, "step_s": t["step_s"] / div, "compile_s": t["compile_s"]})
  for r in rows:
    if r["pass"] == "fwd+bwd":
      r["x_fwd"] = r["step_s"] / next(x["step_s"] for x in rows if x["piece"] == r["piece"] and x["pass"] == "fwd")
  return rows


def load_baseline(path: str):
  """A llada.py of an earlier commit as a separate module (`git show REV:bgpo_jax/models/llada.py
  > FILE`), so one process times the previous model next to today's."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("llada_baseline", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules["llada_baseline"] = mod  # dataclasses resolve the module by name
  spec.loader.exec_module(mod)
  return mod


def inline_elbo_loss(mod, config, tokens, attn, masked, weight):
  """elbo.elbo_term's math (one block head) written against `mod`'s public functions."""
  L = masked.shape[-1]
  noisy = elbo.masked_sequence(tokens, masked, config.mask_token_id)

  def loss(p):
    h = mod.hidden_states(config, p, noisy, attn)[:, -L:]
    logits = mod.lm_head(config, p, h)
    # Target logit by comparison, as elbo._target_logps (a gather's backward is a slow scatter).
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    tgt = jnp.sum(jnp.where(vocab == tokens[:, -L:, None], logits, 0.0), axis=-1)
    logp = tgt - jax.nn.logsumexp(logits, axis=-1)
    return -jnp.sum(weight * jnp.sum(jnp.where(masked, logp, 0.0), axis=-1))
  return loss


def bench_baseline(path: str, preset: str, compute_dtype: str, batch: int, seq: int, resp: int,
                   repeats: int, pad: int, peak: float) -> list[dict]:
  """Baseline (from `path`) and today's default model, forward and forward + backward of the same
  inline ELBO loss, round-robin in one process."""
  old = load_baseline(path)
  mods = [("baseline", old), ("today", llada)]
  calls, names = [], []
  for name, mod in mods:
    preset_name, overrides = preset_parts(preset)  # the baseline file's own config class
    cfg = mod.LLaDAConfig.preset(preset_name, **overrides, compute_dtype=compute_dtype,
                                 param_dtype=compute_dtype)
    params = llada.init_params(make_config(preset, compute_dtype=compute_dtype, param_dtype=compute_dtype),
                               jax.random.key(0))
    tokens, attn, masked, weight = elbo_inputs(cfg, batch, seq, pad, resp)
    calls.append((jax.jit(functools.partial(mod.forward, cfg)), (params, tokens, attn)))
    calls.append((jax.jit(jax.value_and_grad(inline_elbo_loss(mod, cfg, tokens, attn, masked, weight))),
                  (params,)))
    names += [(name, "fwd"), (name, "fwd+bwd")]
  times = common.interleaved(calls, repeats)
  flops = llada.forward_flops(make_config(preset), batch, seq)
  rows = []
  for (name, kind), t in zip(names, times):
    f = flops * (3 if kind == "fwd+bwd" else 1)
    rows.append({"impl": f"jax {name}", "pass": kind, "preset": preset, "compute": compute_dtype,
                 "batch": batch, "seq": seq, "compile_s": t["compile_s"], "step_s": t["step_s"],
                 "tokens_per_s": batch * seq / t["step_s"], "TFLOP/s": f / t["step_s"] / 1e12,
                 "MFU": f / t["step_s"] / peak})
  for name, _ in mods:
    fw, fb = (r for r in rows if r["impl"] == f"jax {name}")
    fb["x_fwd"] = fb["step_s"] / fw["step_s"]
  base_fb = rows[1]["step_s"]
  for r in rows:
    r["vs_baseline"] = (rows[0] if r["pass"] == "fwd" else rows[1])["step_s"] / r["step_s"]
  del base_fb
  return rows


def bench_sampler(config: llada.LLaDAConfig, impls: list[str], prompt: int, gen: int, steps: int,
                  repeats: int) -> list[dict]:
  params = llada.init_params(config, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (1, prompt), 6, config.vocab_size).astype(jnp.int32)
  mask = jnp.ones((1, prompt), jnp.int32)
  settings = sampler_lib.SamplerSettings(gen_length=gen, steps=steps, block_length=gen,
                                         temperature=0.0)
  calls = []
  for impl in impls:
    c = dataclasses.replace(config, attention_impl=impl)

    @jax.jit
    def gen_fn(params, toks, mask, c=c):  # as the rollouts call it: the head on the current block
      return sampler_lib.generate(c, params, toks, mask, settings, jax.random.key(2))
    calls.append((gen_fn, (params, toks, mask)))
  times = common.interleaved(calls, repeats)
  return [{"impl": f"jax {impl}", "pass": f"generate {gen} tok / {steps} steps", "batch": 1,
           "seq": prompt + gen, "step_s": t["step_s"], "compile_s": t["compile_s"],
           "tokens_per_s": gen / t["step_s"]} for impl, t in zip(impls, times)]


def run_torch(python: str, spec: dict) -> dict:
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_llada.py")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  # Spin-waiting OpenMP threads make torch 10-15x slower on a shared, oversubscribed CPU.
  env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  out = subprocess.run([python, script, json.dumps(spec)], capture_output=True, text=True, env=env,
                       check=False)
  if out.returncode:
    raise RuntimeError(f"{python} {script} failed (is torch installed there?):\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="m30", choices=["m30", "m1b", "tiny", "small", "llada_8b"])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--resp", type=int, default=256, help="response positions of the ELBO loss")
  ap.add_argument("--pad", type=int, default=16, help="left-padded positions per row")
  ap.add_argument("--dtypes", default="float32", help="compute dtypes, comma separated")
  ap.add_argument("--param-dtype", default=None, help="default: the compute dtype")
  ap.add_argument("--impls", default="xla,auto",
                  help=f"attention implementations, comma separated ({', '.join(llada.ATTENTION_IMPLS)})")
  ap.add_argument("--no-backward", action="store_true", help="forward rows only")
  ap.add_argument("--torch-python", default=None,
                  help="an interpreter with torch: time benchmarks/torch_llada.py on the same shapes")
  ap.add_argument("--llada-modeling", default=None, metavar="DIR",
                  help="the official modeling_llada.py + configuration_llada.py: compare with them "
                       "(needs --torch-python; benchmarks/official.py)")
  ap.add_argument("--llada-generate", default=None, metavar="FILE",
                  help="ML-GSAI/LLaDA's generate.py: also compare the uncached sampler with it")
  ap.add_argument("--gen-official", default="64,64,32", metavar="GEN,STEPS,BLOCK",
                  help="the sampler row against the official generate(): gen_length,steps,block_length")
  ap.add_argument("--sampler", action="store_true", help="also time generate (64 tokens, 64 steps)")
  ap.add_argument("--baseline", default=None,
                  help="a llada.py of an earlier commit: time it next to today's model (same inline ELBO)")
  ap.add_argument("--family", default="llada", help="model families for the JAX rows, comma separated "
                  "(llada,dream: side by side; the torch, baseline and sampler rows are LLaDA's)")
  ap.add_argument("--pieces", action="store_true",
                  help="only time one layer's pieces (MLP, projections, attention, block, step / layer), "
                       "forward vs forward + backward")
  ap.add_argument("--nominal-peak-tflops", type=float, default=None,
                  help="the accelerator's data-sheet dense peak for the compute dtype (H100 SXM bf16: 989): "
                       "adds MFU_nominal beside MFU against the measured matmul peak")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=None, help="write the records as JSON")
  return ap


def _add_torch_rows(args, rows: list[dict], gen_rows: list[dict]) -> str:
  """Times benchmarks/torch_llada.py on the same shapes (args.torch_python); appends its rows,
  adds vs_torch / MFU_best to ours, and returns the peaks line of the table's title."""
  c = make_config(args.preset)
  spec = dict(d_model=c.d_model, n_layers=c.n_layers, n_heads=c.n_heads, mlp=c.mlp_hidden_size,
              vocab=c.vocab_size, rope_theta=c.rope_theta, batch=args.batch, seq=args.seq,
              pad=args.pad, resp=args.resp, mask_id=c.mask_token_id, repeats=args.repeats)
  if args.sampler:
    spec.update(gen_length=64, gen_steps=64, gen_batch=1, gen_prompt=64,
                gen_repeats=max(2, args.repeats - 1))
  t = run_torch(args.torch_python, spec)
  flops = llada.forward_flops(c, args.batch, args.seq)
  fp32 = common.matmul_peak_flops(jnp.float32)
  for kind, key, f in (("fwd", "fwd_s", flops), ("fwd+bwd", "fwd_bwd_s", 3 * flops)):
    rows.append({"impl": f"torch re-impl {t['torch']}", "pass": kind, "preset": args.preset,
                 "compute": "float32", "batch": args.batch, "seq": args.seq, "step_s": t[key],
                 "tokens_per_s": args.batch * args.seq / t[key], "TFLOP/s": f / t[key] / 1e12,
                 "MFU": f / t[key] / fp32})
  # MFU_best: against the faster of the two libraries' measured GEMM peaks (XLA's and torch's
  # differ by up to 20% on one CPU), the closest this benchmark gets to the hardware's.
  best_peak = max(fp32, t["matmul_peak_flops"])
  peaks = f"; float32 matmul peak: XLA {fp32 / 1e12:.3f}, torch {t['matmul_peak_flops'] / 1e12:.3f} TFLOP/s"
  for r in rows:
    if r["compute"] == "float32":
      r["MFU_best"] = r["TFLOP/s"] * 1e12 / best_peak
  fb = next(r for r in rows if r["impl"].startswith("torch") and r["pass"] == "fwd+bwd")
  fb["x_fwd"] = t["fwd_bwd_s"] / t["fwd_s"]
  for r in rows:  # speed relative to torch (> 1 = faster than torch)
    if r["compute"] == "float32" and not r["impl"].startswith("torch"):
      r["vs_torch"] = t[{"fwd": "fwd_s", "fwd+bwd": "fwd_bwd_s"}[r["pass"]]] / r["step_s"]
  if "gen_s" in t:
    gen_rows.append({"impl": f"torch re-impl {t['torch']}", "pass": "generate 64 tok / 64 steps", "batch": 1,
                     "seq": 128, "step_s": t["gen_s"], "tokens_per_s": 64 / t["gen_s"]})
    for r in gen_rows[:-1]:
      r["vs_torch"] = t["gen_s"] / r["step_s"]
  return peaks


def main_official(args) -> list[dict]:
  """The rows against the official code (benchmarks/official.py), round-robin in one run."""
  from bgpo_jax.benchmarks import official
  if not args.torch_python:
    raise SystemExit("--llada-modeling / --llada-generate need --torch-python (an interpreter with torch)")
  config = make_config(args.preset, compute_dtype="float32", param_dtype="float32")
  gen = tuple(int(x) for x in args.gen_official.split(","))
  rows = official.compare(config, torch_python=args.torch_python, llada_modeling=args.llada_modeling,
                          llada_generate=args.llada_generate, batch=args.batch, seq=args.seq, pad=args.pad,
                          resp=args.resp, gen=gen, prompt_len=min(64, args.seq // 2), repeats=args.repeats)
  official.print_rows(rows)
  common.write_json(args.out, rows, meta={"device": common.device_description(), "args": vars(args),
                                          "argv": sys.argv})
  return rows


def main(argv=None) -> list[dict]:
  args = _parser().parse_args(argv)

  impls = args.impls.split(",")
  load0 = os.getloadavg()[0]
  if args.llada_modeling or args.llada_generate:
    return main_official(args)
  if args.pieces:
    rows = bench_pieces(args.preset, args.batch, args.seq, args.resp, args.pad, args.repeats)
    common.print_table(rows, ["impl", "piece", "pass", "preset", "batch", "seq", "compile_s", "step_s", "x_fwd"],
                       title=f"one layer's pieces on {common.device_description()}; load average "
                             f"{load0:.1f} -> {os.getloadavg()[0]:.1f}")
    common.write_json(args.out, rows, meta={"device": common.device_description(), "args": vars(args),
                                            "load_average": [load0, os.getloadavg()[0]], "argv": sys.argv})
    return rows
  rows = []
  for dt in args.dtypes.split(","):
    peak = common.matmul_peak_flops(jnp.dtype(dt))
    for fam in args.family.split(","):
      rows += bench_impls(args.preset, dt, args.param_dtype, args.batch, args.seq, args.resp,
                          args.repeats, impls, args.pad, not args.no_backward, peak, fam)
  if args.baseline:
    rows += bench_baseline(args.baseline, args.preset, args.dtypes.split(",")[0], args.batch, args.seq,
                           args.resp, args.repeats, args.pad, common.matmul_peak_flops(jnp.dtype(args.dtypes.split(",")[0])))
  gen_rows, peaks = [], ""
  if args.sampler:
    gen_rows = bench_sampler(make_config(args.preset, compute_dtype="float32", param_dtype="float32"),
                             impls, 64, 64, 64, max(2, args.repeats - 1))
  # The peak once more after the timed rows, the faster kept: a fresh process's first
  # measurement can come out low, which would overstate every MFU (one came out 1.05).
  for dt in args.dtypes.split(","):
    peak = common.matmul_peak_flops(jnp.dtype(dt), remeasure=True)
    for r in rows:
      if r.get("compute") == dt:
        r["MFU"] = r["TFLOP/s"] * 1e12 / peak
  if args.nominal_peak_tflops:
    for r in rows:
      r["MFU_nominal"] = r["TFLOP/s"] / args.nominal_peak_tflops
  if args.torch_python:
    peaks = _add_torch_rows(args, rows, gen_rows)
  load1 = os.getloadavg()[0]
  common.print_table(rows, ["impl", "pass", "family", "preset", "compute", "batch", "seq", "compile_s", "step_s",
                            "x_fwd", "tokens_per_s", "TFLOP/s", "MFU", "MFU_nominal", "MFU_best", "vs_torch", "vs_baseline"],
                     title=f"LLaDA forward / forward+backward on {common.device_description()}; "
                           f"load average {load0:.1f} -> {load1:.1f}{peaks}")
  if gen_rows:
    common.print_table(gen_rows, ["impl", "pass", "batch", "seq", "compile_s", "step_s", "tokens_per_s",
                                  "vs_torch"], title="uncached sampler")
  common.write_json(args.out, rows + gen_rows,
                    meta={"device": common.device_description(), "args": vars(args),
                          "load_average": [load0, load1], "argv": sys.argv})
  return rows + gen_rows


if __name__ == "__main__":
  main()
