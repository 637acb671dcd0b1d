"""The MC-variance benchmark (gradient noise and bias against n) and the n sweep, on tiny shapes.

The measurement runs the benchmark's own functions (the objectives' host fields, the train step's
gradient path) on a 1-layer model and a synthetic batch; the sweep's bookkeeping, its memory match
and (slow) its whole command on a tiny run.
"""

import json
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgpo_jax.benchmarks import mc_variance as mcv
from bgpo_jax.benchmarks import memory
from bgpo_jax.benchmarks import n_sweep
from bgpo_jax.models import family
from bgpo_jax.train.rng import RngStreams

ROWS, P, L, G = 8, 8, 16, 4


@pytest.fixture(scope="module")
def setup():
  """A run-like namespace (config, streams, a 1-layer random model) and a fixed synthetic batch
  with group-centred advantages (two groups of G = 4)."""
  config = memory.load_config_file("configs/demo.py", ["--config.rollout.gen_length=16", "--config.rl.group_size=4"])
  model_cfg = family.preset("llada", "tiny", param_dtype="float32", compute_dtype="float32", remat_policy="none",
                            d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden_size=64)
  params = family.module_for(model_cfg).init_params(model_cfg, jax.random.key(0))
  run = types.SimpleNamespace(config=config, rng=RngStreams(0), model_cfg=model_cfg, data_parallel=1,
                              state=types.SimpleNamespace(params=params))
  rng = np.random.default_rng(0)
  adv = rng.normal(size=(ROWS // G, G))
  adv = ((adv - adv.mean(1, keepdims=True)) / adv.std(1, keepdims=True)).reshape(-1).astype(np.float32)
  batch = {"tokens": rng.integers(6, 120, (ROWS, P + L)).astype(np.int32),
           "attention_mask": np.ones((ROWS, P + L), np.int32), "advantages": adv}
  return run, batch, np.full(ROWS, L)


def _fields(run, spec, n, draw, batch, lengths):
  v = mcv.parse_variant(spec)
  b = dict(batch, **mcv.draw_fields(run, v, n, draw, batch, lengths))
  return v, {k: jnp.asarray(x) for k, x in b.items()}


def test_parse_variant():
  v = mcv.parse_variant("bgpo@continuous")
  assert (v.objective, v.estimator, v.hparams) == ("bgpo", "continuous", ())
  assert mcv.parse_variant("espo:bound").hparams == (("bound", True),)
  assert mcv.parse_variant("spg:logp_estimation=elbo:block_length=1").hparams == (("logp_estimation", "elbo"),
                                                                                  ("block_length", 1))
  with pytest.raises(ValueError, match="unknown"):
    mcv.parse_variant("nope")
  with pytest.raises(ValueError, match="stratified or continuous"):
    mcv.parse_variant("bgpo@uniform")


def test_unknown_hparam_is_named(setup):
  run, batch, _ = setup
  with pytest.raises(ValueError, match="not a hyper-parameter of espo"):
    mcv.step_config(run, mcv.parse_variant("espo:boundd"), 2, ROWS, off_policy=False)


def test_log_log_slope_and_moments():
  ns = np.array([1, 2, 4, 8, 16])
  chex.assert_trees_all_close(mcv.log_log_slope(ns, 3.0 * ns ** -0.5), -0.5, atol=1e-9)
  g = np.random.default_rng(1).normal(size=(7, 5))
  m = mcv.Moments()
  for i, row in enumerate(g):
    m.add(row, float(i))
  chex.assert_trees_all_close(m.mean, g.mean(0), atol=1e-12)
  chex.assert_trees_all_close(m.trace_var, float(np.var(g, axis=0, ddof=1).sum()), rtol=1e-10)


def test_gradient_noise_falls_with_n(setup):
  """With the same draws, the stratified BGPO gradient at n = 4 is less noisy than at n = 1, the
  fitted slope is negative, and an unbiased estimator's bias stays near its noise floor."""
  run, batch, lengths = setup
  rows = mcv.measure_variant(run, mcv.parse_variant("bgpo"), (1, 4), batch, lengths, draws=10, ref_n=16,
                             ref_draws=2, params=run.state.params, log=lambda *_: None)
  by_n = {r["n"]: r for r in rows}
  assert set(by_n) == {1, 4, 16} and by_n[16]["reference"]
  for key in ("grad_rel_std", "grad_bias", "grad_bias_floor", "slope", "draws", "policy", "estimator"):
    assert key in by_n[1], key
  assert by_n[4]["grad_rel_std"] < by_n[1]["grad_rel_std"]
  assert by_n[1]["slope"] < -0.2
  assert by_n[1]["policy"] == "on" and by_n[1]["estimator"] == "stratified"
  assert by_n[4]["grad_bias"] < 3 * by_n[4]["grad_bias_floor"]


def test_vrpo_equals_bgpo_on_policy(setup):
  """On-policy, VRPO-OL's gradient is BGPO's for the same masks: why the benchmark measures
  VRPO-OL off-policy only."""
  run, batch, lengths = setup
  out = []
  for spec in ("bgpo", "vrpo_ol"):
    v, b = _fields(run, spec, 4, 3, batch, lengths)
    scfg = mcv.step_config(run, v, 4, ROWS, off_policy=False)
    out.append(mcv._grad_program(run.model_cfg, scfg)(run.state.params, b))
  chex.assert_trees_all_close(out[0], out[1], rtol=1e-4, atol=1e-7)


def test_offpolicy_bound_and_report(setup, tmp_path):
  """Off-policy (old terms from perturbed weights on the same masks), BGPO's value stays below
  VRPO-OL's, and the records carry value statistics into the JSON and the plot."""
  run, batch, lengths = setup
  leaves, tree = jax.tree.flatten(run.state.params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  old = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  values = {}
  for spec in ("bgpo", "vrpo_ol"):
    v, b = _fields(run, spec, 4, 7, batch, lengths)
    scfg = mcv.step_config(run, v, 4, ROWS, off_policy=True)
    b[scfg.impl.old_field.name] = mcv._old_program(run.model_cfg, scfg)(old, b)
    values[spec] = float(mcv._grad_program(run.model_cfg, scfg)(run.state.params, b)[0])
  assert values["bgpo"] <= values["vrpo_ol"] + 1e-7, values

  rows = mcv.measure_variant(run, mcv.parse_variant("vrpo_ol"), (1, 2), batch, lengths, draws=2, ref_n=4, ref_draws=2,
                             params=run.state.params, old_params=old, log=lambda *_: None)
  meta = {"ref_n": 4, "ref_draws": 2, "rows": ROWS, "gen_length": L, "commit": "test", "device": "cpu", "wall_s": 1.0}
  out, png = tmp_path / "mcv.json", tmp_path / "mcv.png"
  mcv.report(rows, meta, str(out), str(png), title="test")
  records = json.loads(out.read_text())
  meta = json.loads((tmp_path / "mcv.json.meta.json").read_text())
  assert {r["n"] for r in records} == {1, 2, 4}
  assert all(r["policy"] == "off" and "value_rel_std" in r for r in records)
  assert all("value_bias" in r for r in records if not r["reference"])
  assert set(meta["slopes"]) == {"vrpo_ol/off"}
  assert png.stat().st_size > 1000


# ------------------------------------------------------------------------------ the n sweep


def test_sweep_summary_and_plot(tmp_path):
  runs = [{"objective": "bgpo", "n": n, "seed": s, "accuracy": 0.1 * n + 0.01 * s, "score": 0.5 + 0.01 * s,
           "accuracy_sft": 0.05, "score_sft": 0.4} for n in (1, 2) for s in (0, 1, 2)]
  runs += [{"objective": "vrpo_ol", "n": 2, "seed": s, "accuracy": 0.2, "score": 0.5} for s in (0, 1, 2)]
  summary = n_sweep.summarize(runs)
  assert [(r["objective"], r["n"]) for r in summary] == [("bgpo", 1), ("bgpo", 2), ("vrpo_ol", 2)]
  chex.assert_trees_all_close(summary[0]["accuracy_mean"], 0.11, atol=1e-12)
  chex.assert_trees_all_close(summary[0]["accuracy_sem"], 0.01 / np.sqrt(3), atol=1e-12)
  assert summary[2]["score_sem"] == 0.0
  png = tmp_path / "sweep.png"
  n_sweep.plot(summary, runs, str(png), title="test")
  assert png.stat().st_size > 1000


def test_plan_runs_seed_by_seed():
  plan = n_sweep.plan_runs((1, 4), (0, 1), 2)
  assert plan == [("bgpo", 1, 0), ("bgpo", 4, 0), ("vrpo_ol", 2, 0), ("bgpo", 1, 1), ("bgpo", 4, 1), ("vrpo_ol", 2, 1)]
  assert n_sweep.plan_runs((1,), (0, 1), 2, vrpo_seeds=(0,)) == [("bgpo", 1, 0), ("vrpo_ol", 2, 0), ("bgpo", 1, 1)]
  assert n_sweep.plan_runs((1,), (0,), -1) == [("bgpo", 1, 0)]


def test_eval_rows_reads_the_evaluations(tmp_path):
  rows = [{"step": 0, "eval/accuracy": 0.1, "eval/score_mean": 0.3}, {"step": 1, "train/loss": 1.0},
          {"step": 2, "eval/accuracy": 0.2, "eval/score_mean": 0.4}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  ev = n_sweep.eval_rows(str(tmp_path))
  assert sorted(ev) == [0, 2] and ev[2]["eval/score_mean"] == 0.4


def test_vrpo_step_memory_grows_past_bgpo():
  """The memory match's measurement: on the sweep's config (a smaller model), VRPO-OL's train step
  at n = 8 needs more than BGPO's at n = 8, whose memory does not grow with n."""
  small = ["--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
           "--config.model.mlp_hidden_size=64"]
  bgpo = n_sweep.step_memory("bgpo", 8, small)
  assert n_sweep.step_memory("vrpo_ol", 8, small) > 1.5 * bgpo


@pytest.mark.slow
def test_sweep_command_end_to_end(tmp_path):
  """The sweep's command on a tiny run: 2 SFT steps, 1 RL step at n = 1, seed 0, no VRPO-OL."""
  tiny = ["--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
          "--config.model.mlp_hidden_size=64", "--config.task.demo_train_size=64", "--config.sft.batch_size=8",
          "--config.sft.micro_batch_per_device=8", "--config.sft.eval_every=2", "--config.eval.num_examples=4",
          "--config.eval.batch_size=4", "--config.task.demo_test_size=4", "--config.rl.prompts_per_step=2",
          "--config.rl.micro_batch_per_device=8", "--config.rollout.steps=4", "--config.eval.steps=4"]
  out = tmp_path / "sweep.json"
  res = n_sweep.main(["--root", str(tmp_path / "root"), "--ns", "1", "--seeds", "0", "--rl-steps", "1",
                      "--sft-steps", "2", "--vrpo-n", "-1", "--out", str(out), "--png", str(tmp_path / "s.png"),
                      "--", *tiny])
  data = json.loads(out.read_text())
  assert [(r["objective"], r["n"], r["seed"]) for r in data["runs"]] == [("bgpo", 1, 0)]
  run = data["runs"][0]
  assert 0.0 <= run["score"] <= 1.0 and "score_sft" in run and run["wall_s"] > 0
  assert res["meta"]["rl_steps"] == 1
