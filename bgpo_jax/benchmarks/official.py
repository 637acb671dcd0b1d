"""Side by side with the peers' own PyTorch code, in one run: the official LLaDA modeling code
(forward, forward + backward of the masked-diffusion loss), the official uncached sampler
(ML-GSAI/LLaDA generate.py) and Fast-dLLM's prefix / dual-cache samplers (NVlabs/Fast-dLLM
llada/generate.py with its own modeling code), on the same random weights and inputs.

`benchmarks.forward --llada-modeling DIR [--llada-generate FILE]` and `benchmarks.sampler
--fast-dllm DIR` call `compare` here. The torch side (`torch_official.py`) runs as a server in
the --torch-python interpreter (torch is never a dependency of bgpo_jax); the driver writes a
float32 checkpoint of our random model (`hf.save`, the official layout) and the inputs, then
times our jitted programs and the server's calls round-robin, each keeping its fastest run
(the server times its own call, so the pipe's round trip is not counted). Sampler rows check
that both sides produced the same tokens (temperature 0).

Rows (name: ours / theirs):
  fwd             llada.forward (all positions, full head) / the official forward under no_grad;
  fwd+bwd elbo    value_and_grad of diffusion.elbo.elbo_term, as the trainer runs it / the official
                  forward + log_softmax at the response positions + backward;
  fwd+bwd plain   value_and_grad of the same loss written inline over hidden_states + lm_head
                  (benchmarks.forward.inline_elbo_loss) / the same official row;
  generate        sampler.generate, cache none / official generate();
  prefix, dual    sampler.generate, cache prefix / dual / generate_with_prefix_cache / _dual_cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bgpo_jax.benchmarks import common


class TorchPeer:
  """The torch_official.py server in `python`; `run(name)` times one call there."""

  def __init__(self, python: str, job: dict):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_official.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Spin-waiting OpenMP threads make torch 10-15x slower on a shared, oversubscribed CPU, and
    # would burn the cores while the JAX rows run.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    self.proc = subprocess.Popen([python, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
    self.info = self._ask({"op": "setup", **job})

  def _ask(self, req: dict) -> dict:
    try:
      self.proc.stdin.write(json.dumps(req) + "\n")
      self.proc.stdin.flush()
      line = self.proc.stdout.readline()
    except BrokenPipeError:
      line = ""
    if not line:
      err = self.proc.stderr.read()[-3000:]
      raise RuntimeError(f"the torch server exited (is torch installed in that interpreter?):\n{err}")
    out = json.loads(line)
    if "error" in out:
      raise RuntimeError(f"torch server: {out['error']}\n{out.get('traceback', '')}")
    return out

  def run(self, name: str) -> dict:
    return self._ask({"op": "run", "name": name})

  def peak(self) -> float:
    return self._ask({"op": "peak"})["matmul_peak_flops"]

  def close(self):
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.close()
      except BrokenPipeError:
        pass
      self.proc.wait(timeout=60)


def jax_timer(fn: Callable, *args) -> Callable[[], dict]:
  """One timed call of a jitted fn (blocked on its result) -> {"seconds", "out"}."""
  def call():
    t0 = time.perf_counter()
    out = common.block(fn(*args))
    return {"seconds": time.perf_counter() - t0, "out": out}
  return call


def round_robin(calls: list[Callable[[], dict]], repeats: int) -> list[dict]:
  """Each call once (warm-up / compile), then `repeats` rounds in turn; each keeps its fastest."""
  recs = []
  for c in calls:
    t0 = time.perf_counter()
    out = c()
    recs.append({"first_s": time.perf_counter() - t0, "all_s": [], "out": out})
  for _ in range(repeats):
    for c, rec in zip(calls, recs):
      rec["all_s"].append(c()["seconds"])
  for rec in recs:
    rec["step_s"] = min(rec["all_s"])
    rec["compile_s"] = max(rec["first_s"] - rec["step_s"], 0.0)
  return recs


def write_peer_inputs(config, params, work: str, tokens, attn, masked, weight, prompt) -> tuple[str, str]:
  """Our random model as an HF LLaDA checkpoint (float32) and the inputs as an npz under `work`."""
  from bgpo_jax.models import hf
  ckpt = os.path.join(work, "checkpoint")
  hf.save(config, params, ckpt, dtype=np.float32)
  inputs = os.path.join(work, "inputs.npz")
  np.savez(inputs, tokens=np.asarray(tokens), attn=np.asarray(attn), masked=np.asarray(masked),
           weight=np.asarray(weight), prompt=np.asarray(prompt))
  return ckpt, inputs


def compare(config, *, torch_python: str, llada_modeling: str | None = None,
            llada_generate: str | None = None, fast_dllm: str | None = None,
            batch: int = 4, seq: int = 512, pad: int = 16, resp: int = 256,
            gen: tuple[int, int, int] = (64, 64, 32), cache_gen: tuple[int, int, int] = (256, 128, 32),
            prompt_len: int = 64, forward_rows: bool = True, repeats: int = 3, threads: int | None = None,
            cache_batch: int = 1) -> list[dict]:
  """The rows of the module docstring that the given paths allow, timed round-robin in one run.

  gen / cache_gen: (gen_length, steps, block_length) of the uncached / cached sampler rows
  (`prompt_len`-token prompts without padding). The uncached row is batch 1; the cached rows run
  `cache_batch` prompts, ours in one call, Fast-dLLM's one call per row (its samplers take one
  row; a rollout samples many rows per prompt batch).
  Returns one dict per row: name, ours_s, theirs_s, speedup (theirs / ours), tokens_equal (sampler
  rows), compile_s, load averages."""
  from bgpo_jax.benchmarks import forward as fwd_bench
  from bgpo_jax.diffusion import elbo
  from bgpo_jax.diffusion import sampler as sampler_lib
  from bgpo_jax.models import llada

  if not (llada_modeling or fast_dllm):
    raise ValueError("compare needs llada_modeling (the official modeling code) and/or fast_dllm")
  if llada_generate and not llada_modeling:
    raise ValueError("the official generate() runs the official model: pass llada_modeling too")
  params = llada.init_params(config, jax.random.key(0))
  tokens, attn, masked, weight = fwd_bench.elbo_inputs(config, batch, seq, pad, resp)
  rng = np.random.default_rng(1)
  prompt = rng.integers(6, config.vocab_size, (cache_batch, prompt_len)).astype(np.int32)

  load0 = os.getloadavg()[0]
  with tempfile.TemporaryDirectory(prefix="bgpo_official_") as work:
    ckpt, inputs = write_peer_inputs(config, params, work, tokens, attn, masked, weight, prompt)
    job = dict(checkpoint=ckpt, inputs=inputs, mask_id=config.mask_token_id, threads=threads,
               llada_modeling=llada_modeling, llada_generate=llada_generate, fast_dllm=fast_dllm,
               gen_length=gen[0], gen_steps=gen[1], gen_block=gen[2],
               cache_gen_length=cache_gen[0], cache_steps=cache_gen[1], cache_block=cache_gen[2])
    peer = TorchPeer(torch_python, job)
    try:
      rows = []  # (name, ours call, theirs call, FLOPs or None)
      flops = llada.forward_flops(config, batch, seq)
      if llada_modeling and forward_rows:
        step = lambda p: -jnp.sum(elbo.elbo_term(config, p, tokens, attn, masked, weight))  # noqa: E731
        plain = fwd_bench.inline_elbo_loss(llada, config, tokens, attn, masked, weight)
        rows += [
          ("fwd", jax_timer(jax.jit(lambda p: llada.forward(config, p, tokens, attn)), params),
           lambda: peer.run("fwd"), flops),
          ("fwd+bwd elbo", jax_timer(jax.jit(jax.value_and_grad(step)), params),
           lambda: peer.run("fwd_bwd"), 3 * flops),
          ("fwd+bwd plain", jax_timer(jax.jit(jax.value_and_grad(plain)), params),
           lambda: peer.run("fwd_bwd"), 3 * flops),
        ]

      def gen_call(cache, g, rows_):
        settings = sampler_lib.SamplerSettings(gen_length=g[0], steps=g[1], block_length=g[2],
                                               temperature=0.0, cache=cache)
        fn = jax.jit(lambda p, t, m: sampler_lib.generate(config, p, t, m, settings, jax.random.key(2)))
        return jax_timer(fn, params, jnp.asarray(prompt[:rows_]), jnp.ones((rows_, prompt_len), jnp.int32))

      if llada_generate:
        rows.append((f"generate {gen[0]} tok / {gen[1]} steps / block {gen[2]}", gen_call("none", gen, 1),
                     lambda: peer.run("generate"), None))
      if fast_dllm:
        per = f", {cache_batch} rows" if cache_batch > 1 else ""
        for cache in ("prefix", "dual"):
          rows.append((f"{cache} {cache_gen[0]} tok / {cache_gen[1]} steps / block {cache_gen[2]}{per}",
                       gen_call(cache, cache_gen, cache_batch), lambda c=cache: peer.run(c), None))
      calls = [c for _, ours, theirs, _ in rows for c in (ours, theirs)]
      recs = round_robin(calls, repeats)
      torch_peak = peer.peak()
    finally:
      peer.close()
  xla_peak = common.matmul_peak_flops(jnp.float32, remeasure=True)
  load1 = os.getloadavg()[0]
  out = []
  for i, (name, _, _, f) in enumerate(rows):
    o, t = recs[2 * i], recs[2 * i + 1]
    row = {"row": name, "ours_s": o["step_s"], "theirs_s": t["step_s"], "speedup": t["step_s"] / o["step_s"],
           "compile_s": o["compile_s"], "load": f"{load0:.1f}-{load1:.1f}",
           "theirs": "Fast-dLLM" if name.startswith(("prefix", "dual")) else "official LLaDA"}
    if f is not None:
      row["MFU_ours"] = f / o["step_s"] / xla_peak
      row["MFU_theirs"] = f / t["step_s"] / torch_peak
    if "tokens" in t["out"]:
      ours_tok = np.asarray(o["out"]["out"])
      theirs_tok = np.asarray(t["out"]["tokens"])
      row["tokens_equal"] = bool(ours_tok.shape == theirs_tok.shape and (ours_tok == theirs_tok).all())
      if not row["tokens_equal"]:
        row["tokens_differ"] = int((ours_tok != theirs_tok).sum()) if ours_tok.shape == theirs_tok.shape else -1
      if "nfe" in t["out"]:
        row["nfe_theirs"] = t["out"]["nfe"]
    out.append(row)
  for r in out:
    r["peaks_GFLOPs"] = f"xla {xla_peak / 1e9:.0f} torch {torch_peak / 1e9:.0f}"
    r["torch"] = peer.info["torch"]
  return out


def print_rows(rows: list[dict]) -> str:
  return common.print_table(rows, ["row", "theirs", "ours_s", "theirs_s", "speedup", "tokens_equal", "MFU_ours",
                                   "MFU_theirs", "compile_s", "load", "peaks_GFLOPs"],
                            title=f"ours vs the peers' own code on {common.device_description()}")


if __name__ == "__main__":
  sys.exit("run through benchmarks.forward --llada-modeling / benchmarks.sampler --fast-dllm")
