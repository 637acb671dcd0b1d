"""Sharded train step on 8 host CPU devices and across 2 jax.distributed processes (subprocesses,
so the forced device count never leaks into other tests)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgpo_jax.models import sharding

WORKER = Path(__file__).with_name("sharded_step_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _result(stdout: str) -> dict:
  lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, stdout[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def meshes():
  p = subprocess.run([sys.executable, str(WORKER), "meshes"], env=_env(8), capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  return _result(p.stdout)


@pytest.mark.slow  # 8-device / multi-process subprocesses
@pytest.mark.parametrize("shape", ["(8, 1, 1)", "(1, 8, 1)", "(2, 2, 2)"])
def test_meshes_match_single_device(meshes, shape):
  ref, got = meshes["single"], meshes[shape]
  np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-4)
  np.testing.assert_allclose(got["sums"], ref["sums"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got["abs_sums"], ref["abs_sums"], rtol=1e-5)


@pytest.mark.slow  # 8-device / multi-process subprocesses
def test_fsdp_mesh_splits_activations(meshes):
  """On (1, 8, 1) the step runs as FSDP: each device computes its own row of the micro-batch
  (no matmul over the global micro-batch's tokens, which is what XLA picks when it keeps the
  embed-split weights in place and gathers the activations) and its scratch memory is a fraction
  of one device's (activations / 8, gradient shards / 8)."""
  m = meshes["fsdp_memory"]
  tokens = m["global_tokens"]
  assert any(tokens in s for s in m["single"]["dot_shapes"])  # the check can see the pattern
  assert not any(tokens in s for s in m["fsdp"]["dot_shapes"]), m["fsdp"]["dot_shapes"]
  ratio = m["fsdp"]["temp_bytes"] / m["single"]["temp_bytes"]
  assert ratio < 0.35, (ratio, m["fsdp"]["temp_bytes"], m["single"]["temp_bytes"])


@pytest.mark.slow  # 8-device / multi-process subprocesses
def test_splash_step_on_a_mesh_runs_and_lowers_for_tpu(meshes):
  """The TPU path of a task config (attention_impl auto = splash) on a (2, 2, 2) mesh: interpreted,
  the step's loss is the bmm attention's; lowered for a TPU with the real kernel, the train step
  and the rollout sampler compile to Mosaic calls. Without a shard_map around the kernel that lowering fails ("Mosaic kernels cannot
  be automatically partitioned"), i.e. on every TPU pod."""
  m = meshes["splash"]
  assert not [k for k in m if k.endswith("_tpu_error")], m
  assert m["step_tpu_custom_calls"] >= 3, m  # the forward kernel and the backward's dq and dkv kernels
  assert m["sampler_tpu_custom_calls"] >= 1, m  # the rollout sampler's prefill
  np.testing.assert_allclose(m["splash_loss"], m["bmm_loss"], rtol=1e-5, atol=1e-6)


def test_constraints_are_no_ops_without_a_mesh():
  """One process device, no context mesh: the model's constraints change nothing (the
  single-device program stays the same), and a mesh of one device does not enter the context."""
  x = jnp.ones((4, 8), jnp.float32)
  assert sharding.constrain(x, ("batch", "act_embed")) is x
  w = sharding.gather_weight(x, ("embed", "mlp"), (None, "mlp"), jnp.bfloat16)
  assert w.dtype == jnp.bfloat16
  chex.assert_trees_all_equal(w, x.astype(jnp.bfloat16))
  fn = lambda a: a + 1
  assert sharding.under_mesh(fn, sharding.make_mesh(devices=jax.devices()[:1])) is fn
  with pytest.raises(ValueError, match="do not match the shape"):
    sharding.constrain(x, ("batch",))


def _spec(spec, ndim):
  """Pads a JSON spec with None to ndim entries (trailing replicated dims may be omitted)."""
  return list(spec) + [None] * (ndim - len(spec))


@pytest.mark.slow  # 8-device / multi-process subprocesses
def test_parameter_shardings_follow_rules(meshes):
  fsdp = meshes["(1, 8, 1)"]["specs"]
  assert _spec(fsdp["blocks"]["q_proj"], 3) == [None, "fsdp", None]
  assert _spec(fsdp["blocks"]["ff_out"], 3) == [None, None, "fsdp"]
  assert _spec(fsdp["wte"], 2) == [None, "fsdp"]
  assert _spec(fsdp["ff_out"], 2) == ["fsdp", None]
  mixed = meshes["(2, 2, 2)"]["specs"]
  assert _spec(mixed["blocks"]["q_proj"], 3) == [None, "fsdp", "tensor"]
  assert _spec(mixed["blocks"]["ff_proj"], 3) == [None, "fsdp", "tensor"]
  assert _spec(mixed["blocks"]["attn_out"], 3) == [None, "tensor", "fsdp"]
  assert _spec(mixed["ff_out"], 2) == ["fsdp", "tensor"]
  assert _spec(mixed["wte"], 2) == ["tensor", "fsdp"]
  # Pure data parallelism replicates every parameter.
  assert all(d is None for s in _leaves(meshes["(8, 1, 1)"]["specs"]) for d in s)
  # The updated parameters come back with the same shardings (the step keeps its layout).
  for shape in ("(1, 8, 1)", "(2, 2, 2)"):
    got = [_spec(s, 3) for s in _leaves(meshes[shape]["actual_specs"])]
    want = [_spec(s, 3) for s in _leaves(meshes[shape]["specs"])]
    assert got == want


def _leaves(tree):
  """Leaves of a JSON tree of specs (lists are leaves)."""
  if isinstance(tree, dict):
    return [x for k in sorted(tree) for x in _leaves(tree[k])]
  return [tree]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # 8-device / multi-process subprocesses
def test_two_processes_reproduce_single_process(meshes):
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, str(WORKER), "distributed", str(i), "2", port], env=_env(1),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, err[-4000:]
    outs.append(_result(out))
  ref = meshes["single"]
  for o in outs:
    assert o["process_count"] == 2
    np.testing.assert_allclose(o["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(o["sums"], ref["sums"], rtol=1e-4, atol=1e-4)
