"""PyTorch side of the side-by-side benchmarks against the peers' own code (`benchmarks.official`):
a server, run in an interpreter that has torch (never a dependency of bgpo_jax; this file imports
nothing from it), that loads

  - the official LLaDA modeling code (modeling_llada.py + configuration_llada.py, as released with
    LLaDA-8B-Instruct) on a checkpoint our `hf.save` wrote,
  - the official uncached sampler (generate.py of ML-GSAI/LLaDA: `generate`),
  - Fast-dLLM's cached samplers (llada/generate.py of NVlabs/Fast-dLLM:
    `generate_with_prefix_cache`, `generate_with_dual_cache`) with Fast-dLLM's own modeling code
    (llada/model/),

each from a path the driver gives, and times one call of an operation per request, so the driver
can interleave them with the JAX rows (round-robin in one run: load swings hit both sides alike).

Protocol: one JSON object per line on stdin, one JSON line back on stdout.
  {"op": "setup", "checkpoint": DIR, "inputs": NPZ, "llada_modeling": DIR?, "llada_generate": FILE?,
   "fast_dllm": DIR?, "threads": n?, ...}     -> {"torch": version, ...}
  {"op": "run", "name": NAME}                 -> {"seconds": s, "tokens": [[...]]?, "nfe": n?}
  {"op": "quit"}
NAME: fwd (no_grad logits), fwd_bwd (the masked-diffusion ELBO loss of benchmarks.forward and its
backward: log_softmax of the official forward's logits at the response positions, the masked ones
summed with weight 1/t), generate (official generate(), the first prompt row), prefix / dual
(Fast-dLLM, one call per prompt row: its samplers take one row).

What the loader works around in the released code (nothing of the math): modeling_llada.py reads
`block.flash_attn_with_kvcache`, which it sets only when flash_attention is on (None here); the
flat release directory has no package, so its two files are copied into one (relative import).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time


def _import_package(src_dir: str, name: str):
  """src_dir's modeling_llada.py / configuration_llada.py as package `name` (its relative import
  needs a package) -> the modeling module."""
  root = tempfile.mkdtemp(prefix="llada_pkg_")
  pkg = os.path.join(root, name)
  os.makedirs(pkg)
  for f in ("modeling_llada.py", "configuration_llada.py"):
    shutil.copy(os.path.join(src_dir, f), pkg)
  open(os.path.join(pkg, "__init__.py"), "w").close()
  sys.path.insert(0, root)
  return importlib.import_module(f"{name}.modeling_llada")


def _load_file(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod
  spec.loader.exec_module(mod)
  return mod


def _load_model(model_cls, checkpoint: str):
  import torch
  model = model_cls.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
  for blk in model.model.transformer.blocks:
    if not hasattr(blk, "flash_attn_with_kvcache"):
      blk.flash_attn_with_kvcache = None
  return model


class Server:
  def __init__(self, job: dict):
    import numpy as np
    import torch

    if job.get("threads"):
      torch.set_num_threads(int(job["threads"]))
    torch.manual_seed(0)
    self.job = job
    d = np.load(job["inputs"])
    self.tokens = torch.from_numpy(d["tokens"]).long()
    self.attn = torch.from_numpy(d["attn"]).long()
    self.masked = torch.from_numpy(d["masked"]).bool()
    self.weight = torch.from_numpy(d["weight"]).float()
    self.prompt = torch.from_numpy(d["prompt"]).long()
    self.mask_id = int(job["mask_id"])
    self.model = self.fast_model = self.generate = self.fast = None
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if job.get("llada_modeling"):
      modeling = _import_package(job["llada_modeling"], "official_llada")
      self.model = _load_model(modeling.LLaDAModelLM, job["checkpoint"])
      info["llada_modeling"] = os.path.abspath(job["llada_modeling"])
    if job.get("llada_generate"):
      self.generate = _load_file(job["llada_generate"], "official_llada_generate").generate
      info["llada_generate"] = os.path.abspath(job["llada_generate"])
    if job.get("fast_dllm"):
      # Fast-dLLM's generate.py imports `model.modeling_llada` (its own copy) from its folder.
      sys.path.insert(0, os.path.join(job["fast_dllm"], "llada"))
      self.fast = _load_file(os.path.join(job["fast_dllm"], "llada", "generate.py"), "fast_dllm_generate")
      self.fast_model = _load_model(self.fast.LLaDAModelLM, job["checkpoint"])
      info["fast_dllm"] = os.path.abspath(job["fast_dllm"])
    self.info = info

  # --- operations: each returns (result dict) after running once
  def fwd(self):
    import torch
    with torch.no_grad():
      self.model(input_ids=self.tokens, attention_mask=self.attn).logits
    return {}

  def fwd_bwd(self):
    import torch
    import torch.nn.functional as F
    Lr = self.masked.shape[1]
    noisy = self.tokens.clone()
    noisy[:, -Lr:] = torch.where(self.masked, self.mask_id, self.tokens[:, -Lr:])
    self.model.zero_grad(set_to_none=True)
    logits = self.model(input_ids=noisy, attention_mask=self.attn).logits
    logp = F.log_softmax(logits[:, -Lr:].float(), dim=-1)
    tgt = logp.gather(-1, self.tokens[:, -Lr:, None])[..., 0]
    loss = -(self.weight * (tgt * self.masked).sum(-1)).sum()
    loss.backward()
    return {"loss": float(loss)}

  def _gen_args(self):
    j = self.job
    return dict(steps=j["gen_steps"], gen_length=j["gen_length"], block_length=j["gen_block"],
                temperature=0.0, remasking="low_confidence", mask_id=self.mask_id)

  def generate_op(self):
    out = self.generate(self.model, self.prompt[:1], **self._gen_args())
    return {"tokens": out.tolist()}

  def _fast(self, fn_name: str):
    """Fast-dLLM's sampler on every prompt row, one call per row (its samplers take one row)."""
    import torch
    j = self.job
    outs, nfe = [], 0
    for row in self.prompt:
      out, n = getattr(self.fast, fn_name)(
          self.fast_model, row[None], steps=j["cache_steps"], gen_length=j["cache_gen_length"],
          block_length=j["cache_block"], temperature=0.0, remasking="low_confidence", mask_id=self.mask_id)
      outs.append(out)
      nfe += int(n)
    return {"tokens": torch.cat(outs).tolist(), "nfe": nfe}

  def run(self, name: str) -> dict:
    fn = {"fwd": self.fwd, "fwd_bwd": self.fwd_bwd, "generate": self.generate_op,
          "prefix": lambda: self._fast("generate_with_prefix_cache"),
          "dual": lambda: self._fast("generate_with_dual_cache")}[name]
    t0 = time.perf_counter()
    out = fn()
    out["seconds"] = time.perf_counter() - t0
    return out

  def matmul_peak(self) -> dict:
    """The float32 1024^3 GEMM peak through torch (fastest of 25 after 5 warm-ups), as
    bgpo_jax.benchmarks.common.matmul_peak_flops measures XLA's."""
    import torch
    a = torch.ones(1024, 1024)
    for _ in range(5):
      a @ a
    best = float("inf")
    for _ in range(25):
      t0 = time.perf_counter()
      a @ a
      best = min(best, time.perf_counter() - t0)
    return {"matmul_peak_flops": 2.0 * 1024**3 / best}


def main() -> None:
  server = None
  for line in sys.stdin:
    req = json.loads(line)
    try:
      if req["op"] == "setup":
        server = Server(req)
        out = server.info
      elif req["op"] == "run":
        out = server.run(req["name"])
      elif req["op"] == "peak":
        out = server.matmul_peak()
      elif req["op"] == "quit":
        break
      else:
        raise ValueError(f"unknown op {req['op']!r}")
    except Exception as e:  # reported to the driver, which raises it with the traceback
      import traceback
      out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
  main()
