"""PyTorch side of `benchmarks.forward --torch-python`: a LLaDA forward, forward + backward and
uncached generate() timed in a separate interpreter that has torch (torch is never a dependency
of bgpo_jax; this file imports nothing from it).

This is an independent minimal re-implementation of the math of LLaDA's PyTorch modeling code
(modeling_llada.py of GSAI-ML/LLaDA-8B-Instruct, whose file is not available here) and of the
reference generate() loop, written for the same shapes as our model:
  - q/k/v/attn_out, ff_proj (gate), up_proj, ff_out as bias-free nn.Linear; RMSNorm (float32,
    weight only); rotate-half RoPE in float32 on [B, H, S, hd];
  - attention = F.scaled_dot_product_attention(q, k, v, attn_mask) with the key padding as an
    additive float bias (0 / finfo.min, as LLaDA builds it from attention_mask), is_causal=False;
  - loss = the masked-diffusion ELBO term: log_softmax over the vocabulary at the response
    positions, the masked ones summed with weight 1/t;
  - generate = the reference low-confidence remasking loop: every step one full forward under
    no_grad, softmax, argmax candidates, the k most confident masked positions committed.

  python bgpo_jax/benchmarks/torch_llada.py '{"d_model": 512, ...}'   # prints one JSON line
"""

from __future__ import annotations

import json
import math
import sys
import time


def _build_model(spec: dict):
  """The LLaDA-shaped torch model for `spec` (d_model, n_layers, n_heads, mlp, vocab, rope_theta):
  tokens [B, S] int64, attention_mask [B, S] (1 = real key) -> logits float32 [B, S, vocab].
  Matrices ~ N(0, 0.02^2) from torch's global generator (seeded by the caller)."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  D, L, H, M, V = spec["d_model"], spec["n_layers"], spec["n_heads"], spec["mlp"], spec["vocab"]
  hd = D // H
  theta, eps = spec.get("rope_theta", 10000.0), 1e-5

  class RMSNorm(nn.Module):
    def __init__(self):
      super().__init__()
      self.weight = nn.Parameter(torch.ones(D))

    def forward(self, x):
      xf = x.float()
      xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
      return (xf * self.weight).to(x.dtype)

  def rope_tables(S):
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
    f = torch.outer(torch.arange(S, dtype=torch.float), inv)
    e = torch.cat([f, f], -1)
    return e.cos()[None, None], e.sin()[None, None]

  def rope(t, cos, sin):
    t1, t2 = t.float().chunk(2, dim=-1)
    return (t.float() * cos + torch.cat([-t2, t1], -1) * sin).to(t.dtype)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.attn_norm, self.ff_norm = RMSNorm(), RMSNorm()
      self.q_proj, self.k_proj, self.v_proj, self.attn_out = (nn.Linear(D, D, bias=False) for _ in range(4))
      self.ff_proj, self.up_proj = nn.Linear(D, M, bias=False), nn.Linear(D, M, bias=False)
      self.ff_out = nn.Linear(M, D, bias=False)

    def forward(self, x, cos, sin, bias):
      B, S, _ = x.shape
      n = self.attn_norm(x)
      q, k, v = (p(n).view(B, S, H, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
      q, k = rope(q, cos, sin), rope(k, cos, sin)
      a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=False)
      x = x + self.attn_out(a.transpose(1, 2).reshape(B, S, D))
      m = self.ff_norm(x)
      return x + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))

  class Model(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte = nn.Embedding(V, D)
      self.blocks = nn.ModuleList(Block() for _ in range(L))
      self.ln_f = RMSNorm()
      self.ff_out = nn.Linear(D, V, bias=False)

    def forward(self, tokens, attention_mask):
      S = tokens.shape[1]
      cos, sin = rope_tables(S)
      bias = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float).min
      x = self.wte(tokens)
      for blk in self.blocks:
        x = blk(x, cos, sin, bias)
      return self.ff_out(self.ln_f(x)).float()

  model = Model()
  for p in model.parameters():
    if p.dim() > 1:
      nn.init.normal_(p, std=0.02)
  return model


def _generate(model, prompt, gen_length: int, steps: int, mask_id: int):
  """The reference loop (one block): every step a full forward, softmax, argmax candidates, the
  `k` most confident masked positions committed; k from the even schedule. prompt [B, P] ->
  [B, P + gen_length]."""
  import torch
  import torch.nn.functional as F

  Bp = prompt.shape[0]
  x = torch.full((Bp, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
  x[:, :prompt.shape[1]] = prompt
  am = torch.ones_like(x)
  base, rem = divmod(gen_length, steps)
  with torch.no_grad():
    for i in range(steps):
      k = base + (1 if i < rem else 0)
      is_mask = x == mask_id
      logits = model(x, am)
      x0 = logits.argmax(-1)
      conf = torch.gather(F.softmax(logits, -1), -1, x0[..., None])[..., 0]
      conf = torch.where(is_mask, conf, torch.tensor(-math.inf))
      x0 = torch.where(is_mask, x0, x)
      for b in range(Bp):
        idx = torch.topk(conf[b], k).indices
        x[b, idx] = x0[b, idx]
  return x


def _best(fn, repeats: int) -> tuple[float, list[float]]:
  """(fastest, all) wall seconds of `repeats` calls of fn after one warm-up call."""
  fn()  # warm-up
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return min(ts), ts


def main(spec: dict) -> dict:
  import torch
  import torch.nn.functional as F

  torch.manual_seed(0)
  torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
  model = _build_model(spec)
  V = spec["vocab"]
  B, S, pad = spec["batch"], spec["seq"], spec.get("pad", 0)
  g = torch.Generator().manual_seed(0)
  tokens = torch.randint(0, V, (B, S), generator=g)
  attn = torch.ones(B, S, dtype=torch.long)
  attn[:, :pad] = 0
  Lr = spec["resp"]  # response positions of the ELBO
  mask = torch.rand(B, Lr, generator=g) < 0.5
  weight = torch.full((B,), 2.0)
  noisy = tokens.clone()
  noisy[:, -Lr:] = torch.where(mask, spec["mask_id"], tokens[:, -Lr:])

  def loss_fn():
    logp = F.log_softmax(model(noisy, attn)[:, -Lr:], dim=-1)
    tgt = logp.gather(-1, tokens[:, -Lr:, None])[..., 0]
    return -(weight * (tgt * mask).sum(-1)).sum()

  def fwd():
    with torch.no_grad():
      return model(tokens, attn)

  def fwd_bwd():
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss

  out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
  r = spec.get("repeats", 3)
  # The same peak measurement as bgpo_jax.benchmarks.common.matmul_peak_flops (1024^2 float32,
  # fastest of 25 after 5 warm-ups, once more after the timed runs, the faster kept), through
  # torch's GEMM library (MKL / oneDNN on x86).
  a = torch.ones(1024, 1024)
  peak = lambda: 2.0 * 1024**3 / _best(lambda: a @ a, 25)[0]  # noqa: E731
  for _ in range(4):
    a @ a
  out["matmul_peak_flops"] = peak()
  out["fwd_s"], out["fwd_all_s"] = _best(fwd, r)
  out["fwd_bwd_s"], out["fwd_bwd_all_s"] = _best(fwd_bwd, r)
  if spec.get("gen_length"):
    prompt = torch.randint(6, V, (spec["gen_batch"], spec["gen_prompt"]), generator=g)
    out["gen_s"], out["gen_all_s"] = _best(
        lambda: _generate(model, prompt, spec["gen_length"], spec["gen_steps"], spec["mask_id"]),
        spec.get("gen_repeats", 2))
  out["matmul_peak_flops"] = max(out["matmul_peak_flops"], peak())
  return out


if __name__ == "__main__":
  print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
