"""benchmarks.forward: its rows on a tiny model, and the ~1B GPU preset by shapes."""
import json

import jax
import jax.numpy as jnp

from bgpo_jax.benchmarks import forward
from bgpo_jax.diffusion import elbo
from bgpo_jax.models import llada


def test_forward_benchmark_rows_and_json(tmp_path):
  out = tmp_path / "fwd.json"
  rows = forward.main(["--preset", "tiny", "--batch", "1", "--seq", "32", "--resp", "8", "--pad", "2",
                       "--impls", "xla,bmm", "--repeats", "1", "--out", str(out)])
  assert [(r["impl"], r["pass"]) for r in rows] == [
    ("jax xla", "fwd"), ("jax xla", "fwd+bwd"), ("jax bmm", "fwd"), ("jax bmm", "fwd+bwd")]
  for r in rows:
    assert r["step_s"] > 0 and r["MFU"] > 0, r
    if r["pass"] == "fwd+bwd":
      assert r["x_fwd"] > 0 and r["GFLOP"] > 0
  assert len(json.loads(out.read_text())) == 4
  assert json.loads((tmp_path / "fwd.json.meta.json").read_text())["args"]["preset"] == "tiny"


def test_m1b_preset_is_the_full_size_layout_at_about_1b():
  c = forward.make_config("m1b", compute_dtype="bfloat16", param_dtype="bfloat16")
  full = llada.LLaDAConfig.preset("llada_8b")
  assert 1.2e9 < c.num_params() < 1.5e9
  assert (c.vocab_size, c.mask_token_id, c.head_dim) == (full.vocab_size, full.mask_token_id, 128)
  assert llada.attention_impl_for(c, "cuda") == "cudnn"  # the kernel the GPU row measures
  # The benchmark's ELBO step traces at the GPU shapes (abstractly: nothing is allocated).
  params = jax.eval_shape(lambda: llada.init_params(c, jax.random.key(0)))
  tokens, attn, masked, weight = forward.elbo_inputs(c, 2, 256, 16, 64)
  loss = lambda p: -jnp.sum(elbo.elbo_term(c, p, tokens, attn, masked, weight))  # noqa: E731
  value, grads = jax.eval_shape(jax.value_and_grad(loss), params)
  assert value.shape == () and grads["wte"].shape == (full.vocab_size, 2048)


def test_forward_benchmark_baseline_rows():
  # --baseline times an earlier commit's llada.py next to today's; today's file stands in for it.
  rows = forward.main(["--preset", "tiny", "--batch", "1", "--seq", "32", "--resp", "8", "--pad", "2",
                       "--impls", "bmm", "--no-backward", "--repeats", "1", "--baseline", llada.__file__])
  base = [(r["impl"], r["pass"]) for r in rows if "vs_baseline" in r]
  assert base == [("jax baseline", "fwd"), ("jax baseline", "fwd+bwd"), ("jax today", "fwd"),
                  ("jax today", "fwd+bwd")]
  assert all(r["vs_baseline"] > 0 for r in rows if "vs_baseline" in r)
