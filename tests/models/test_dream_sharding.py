"""Dream under LLaDA's sharding rules on 8 host CPU devices (a subprocess, so the forced device
count stays out of the other tests): FSDP x tensor layouts of every parameter, biases included,
and the sharded forward and gradient equal the single-device ones."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # an 8-device subprocess

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from bgpo_jax.diffusion import elbo
from bgpo_jax.models import dream, sharding
from bgpo_jax.train import mesh as mesh_lib, state as state_lib

cfg = dream.DreamConfig.preset("tiny", n_layers=2)
params = dream.init_params(cfg, jax.random.key(0))
params["blocks"]["q_bias"] = params["blocks"]["q_bias"] + 0.3
params["blocks"]["v_bias"] = params["blocks"]["v_bias"] - 0.2
rng = np.random.default_rng(0)
tokens = jnp.asarray(rng.integers(6, 120, (8, 12)), jnp.int32)
attn = jnp.asarray(np.concatenate([np.zeros((8, 2), np.int32), np.ones((8, 10), np.int32)], 1))
mask = jnp.asarray(rng.random((8, 6)) < 0.5)

def loss(p):
  return elbo.elbo_term(cfg, p, tokens, attn, mask, jnp.ones((8,))).sum()

ref_logits = dream.forward(cfg, params, tokens, attn)
ref_grad = jax.grad(loss)(params)
mesh = mesh_lib.make_mesh((1, 4, 2), jax.devices())
shardings = state_lib.param_shardings(cfg, mesh)
specs = jax.tree.map(lambda s: str(s.spec), shardings)
p = jax.device_put(params, shardings)
logits = jax.jit(sharding.under_mesh(lambda p: dream.forward(cfg, p, tokens, attn), mesh))(p)
grad = jax.jit(sharding.under_mesh(jax.grad(loss), mesh), out_shardings=shardings)(p)
err_l = float(jnp.abs(logits - ref_logits).max())
err_g = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)))
gspec = str(grad["blocks"]["q_bias"].sharding.spec)
print("RESULT " + json.dumps({"specs": specs, "err_logits": err_l, "err_grad": err_g, "grad_q_bias_spec": gspec}))
"""


def test_dream_shards_like_llada_and_matches_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
  lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, p.stdout[-2000:] + p.stderr[-3000:]
  r = json.loads(lines[-1][len("RESULT "):])
  s = r["specs"]
  assert s["wte"] == "P('tensor', 'fsdp')"  # vocab over tensor, embed over fsdp
  assert s["blocks"]["q_proj"] == "P(None, 'fsdp', 'tensor')"
  assert s["blocks"]["q_bias"] == "P(None, 'tensor')"  # follows the heads axis
  assert s["blocks"]["k_bias"] == "P(None, 'tensor')"
  assert s["blocks"]["attn_out"] == "P(None, 'tensor', 'fsdp')"
  assert s["ff_out"] == "P('fsdp', 'tensor')"
  assert r["grad_q_bias_spec"] == "P(None, 'tensor')"
  assert r["err_logits"] < 1e-4 and r["err_grad"] < 1e-4, r
