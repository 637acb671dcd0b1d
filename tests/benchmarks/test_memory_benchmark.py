"""The memory benchmark's functions on a tiny config, and its claims in miniature: BGPO's compiled
temp memory is flat in n, VRPO-OL's grows with n; the fit search and the per-layer extrapolation."""

import math

import numpy as np
import pytest

from bgpo_jax.benchmarks import memory

# Tiny shapes: 4 compiles in all (compiling dominates: ~7-12 s each on a 2-core CPU).
LENS = dict(batch=4, micro_batch=2, prompt_len=16, gen_length=32)


@pytest.fixture(scope="module")
def rows():
  """BGPO timed (its executables' memory analysis comes along), VRPO-OL compiled on abstract arrays."""
  cfg = memory.model_config("tiny", remat="full", n_layers=2)
  timed = memory.time_rows(cfg, "bgpo", (2, 8), repeats=1, peak=1e12, **LENS)
  out = {("bgpo", r["n"]): r for r in timed}
  for n in (2, 8):
    out["vrpo_ol", n] = memory.memory_row(cfg, "vrpo_ol", n, **LENS)
  return cfg, out


@pytest.mark.slow  # the benchmark itself: 4 step compiles and timed steps (shared fixture)
def test_time_rows_run_and_report(rows):
  cfg, r = rows
  for n in (2, 8):
    t = r["bgpo", n]
    assert t["step_s"] > 0 and math.isfinite(t["step_s"]) and len(t["all_s"]) == 1
    assert t["model_flops"] == pytest.approx(
        n * 3 * memory.llada.forward_flops(cfg, LENS["batch"], LENS["prompt_len"] + LENS["gen_length"]))
    assert 0 < t["mfu"] < 1
    assert t["timed_total_bytes"] > t["timed_temp_bytes"] > 0


@pytest.mark.slow  # the benchmark itself: 4 step compiles and timed steps (shared fixture)
def test_bgpo_memory_flat_vrpo_grows(rows):
  _, r = rows
  b2, b8 = r["bgpo", 2]["timed_temp_bytes"], r["bgpo", 8]["timed_temp_bytes"]
  v2, v8 = r["vrpo_ol", 2]["temp_bytes"], r["vrpo_ol", 8]["temp_bytes"]
  assert b8 <= 1.02 * b2, (b2, b8)  # only the [n, B, L] masks' split copy may grow
  assert v2 > b2  # the same n, all samples' graph at once
  assert v8 >= 1.3 * v2, (v2, v8)
  assert v8 - v2 > 20 * abs(b8 - b2)
  assert r["vrpo_ol", 8]["total_bytes"] - r["vrpo_ol", 2]["total_bytes"] >= v8 - v2 - 2**20
  # summarize() reads the same claims off the records.
  recs = [dict(objective="bgpo", n=n, temp_bytes=r["bgpo", n]["timed_temp_bytes"],
               total_bytes=r["bgpo", n]["timed_total_bytes"], step_s=r["bgpo", n]["step_s"]) for n in (2, 8)]
  recs += [dict(r["vrpo_ol", n], step_s=None) for n in (2, 8)]
  s = memory.summarize(recs, flops_per_sample=1.0, peak=1.0)
  assert s["bgpo"]["temp_ratio"] <= 1.02 and s["vrpo_ol"]["temp_ratio"] >= 1.3
  assert s["vrpo_ol"]["temp_bytes_per_sample"] > 1000 * abs(s["bgpo"]["temp_bytes_per_sample"])
  assert "time_per_sample_s" in s["bgpo"] and "time_per_sample_s" not in s["vrpo_ol"]


@pytest.mark.parametrize("k,max_n,want", [(0, 64, 0), (1, 64, 1), (5, 64, 5), (37, 64, 37),
                                          (64, 64, 64), (1000, 48, 48), (47, 48, 47)])
def test_largest_fitting_n(k, max_n, want):
  best, probes = memory.largest_fitting_n(lambda n: n <= k, max_n)
  assert best == want
  assert len(probes) <= 2 * math.ceil(math.log2(max_n)) + 1  # doubling + bisection, not a scan
  assert all(ok == (n <= k) for n, ok in probes)


def test_gpu_fit_with_fake_limit(monkeypatch):
  # The search and its glue against a fake byte limit, with a modelled compile: BGPO flat at
  # 100 MB, VRPO-OL 100 MB + 30 MB per sample.
  def fake_row(model_cfg, obj, n, **kw):
    temp = 100e6 + (30e6 * n if obj == "vrpo_ol" else 0.0)
    return {"objective": obj, "n": n, "temp_bytes": temp, "total_bytes": temp + 50e6}

  monkeypatch.setattr(memory, "memory_row", fake_row)
  cfg = memory.model_config("tiny")
  out = memory.gpu_fit(cfg, ["bgpo", "vrpo_ol"], batch=8, micro_batch=1, prompt_len=16, gen_length=32,
                       max_n=256, bytes_limit=int(1e9), headroom=0.9)
  got = {r["objective"]: r for r in out}
  assert got["bgpo"]["max_fitting_n"] == 256 and got["bgpo"]["capped_at_max_n"]
  # 150 MB + 30 MB * n <= 900 MB  ->  n = 25.
  assert got["vrpo_ol"]["max_fitting_n"] == 25 and not got["vrpo_ol"]["capped_at_max_n"]
  assert got["vrpo_ol"]["total_bytes"] <= 0.9e9


def test_gpu_fit_needs_a_byte_limit_on_cpu():
  with pytest.raises(RuntimeError, match="bytes_limit"):
    memory.device_bytes_limit()


def test_extrapolate_layers_is_affine():
  a = {"n_layers": 4, "temp_bytes": 10.0, "total_bytes": 20.0, "objective": "bgpo"}
  b = {"n_layers": 8, "temp_bytes": 14.0, "total_bytes": 26.0, "objective": "bgpo"}
  out = memory.extrapolate_layers(a, b, 32)
  np.testing.assert_allclose([out["temp_bytes"], out["total_bytes"]], [38.0, 62.0])
  assert out["temp_bytes_per_layer"] == 1.0 and out["n_layers"] == 32
  assert out["extrapolated_from"] == [4, 8]


@pytest.mark.slow  # a subprocess compiling on 4 fake devices
def test_plan_a_task_config_cli(tmp_path):
  """`--plan-8b --config=FILE --devices N --out FILE` plans the config's own mesh and batch, train
  step and sampler (a 2-layer LLaDA-8B on 4 fake devices here, to stay quick)."""
  import json
  import subprocess
  import sys
  from pathlib import Path

  root = Path(__file__).resolve().parents[2]
  out = tmp_path / "plan.json"
  p = subprocess.run([sys.executable, "-m", "bgpo_jax.benchmarks.memory", "--plan-8b",
                      "--config=configs/sudoku.py", "--devices", "4", "--plan-n-layers", "2",
                      "--config.rl.num_mc_samples=8", "--config.rl.kl_beta=0.04", "--config.rl.updates_per_batch=2",
                      "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  recs = json.loads(out.read_text())
  # mu = 2 and a KL: the no-gradient pass storing the old and reference terms is planned too.
  assert [r["what"] for r in recs] == ["train_step", "old_terms", "sampler"]
  for r in recs:
    assert r["config"] == ("configs/sudoku.py --config.rl.num_mc_samples=8 --config.rl.kl_beta=0.04 "
                           "--config.rl.updates_per_batch=2")
    assert r["devices"] == 4 and r["mesh"] == [1, 4, 1]
    assert r["n_layers"] == 2 and r["total_bytes"] > 0 and "H100" not in r
  step, terms, sampler = recs
  # The frozen bfloat16 reference, a quarter per device, stays resident beside every program.
  ref = 2 * step["params"] / 4
  for r in recs:
    assert ref <= r["resident_reference_bytes"] <= 1.01 * ref + 2**20
  assert step["peak_bytes"] == step["total_bytes"] + step["resident_reference_bytes"]
  assert terms["peak_bytes"] == (terms["total_bytes"] + terms["resident_opt_state_bytes"]
                                 + terms["resident_reference_bytes"])
  assert 0 < terms["temp_bytes"] < step["temp_bytes"]  # forward only, no gradient
  # The config's settings (n overridden as on the trainer's command line): 16 prompts x G 8,
  # 256-token responses after a 512 bucket.
  assert step["rows"] == 128 and step["n"] == 8 and step["prompt_len"] + step["gen_length"] == 768
  assert step["micro_batch_rows"] == 4  # rl.micro_batch_per_device 1 x 4 devices
  # FSDP: float32 params + both AdamW moments, a quarter of them per device (plus the batch).
  state = 3 * 4 * step["params"] / 4
  assert state <= step["argument_bytes"] <= 1.05 * state + 2**20
  # The sampler reads the same float32 params; its peak counts the resident moments too.
  assert sampler["argument_bytes"] >= 4 * step["params"] / 4
  assert sampler["peak_bytes"] == (sampler["total_bytes"] + sampler["resident_opt_state_bytes"]
                                   + sampler["resident_reference_bytes"])
  assert "as each config runs it" in p.stdout and recs[0]["model"] == "llada_8b"


@pytest.mark.slow  # a subprocess compiling on 1 fake device
def test_plan_a_lora_config_on_one_device(tmp_path):
  """`--plan-8b --config=configs/math.py:lora --devices 1`: the adapters-only train state, the frozen
  bf16 base an argument at 2 bytes per weight (compiled as a float32 stand-in: XLA:CPU would
  otherwise keep a float32 copy of it), the old-terms pass on base + adapters, and the unmerged
  sampler holding no second copy (a 2-layer LLaDA-8B)."""
  import json
  import subprocess
  import sys
  from pathlib import Path

  from bgpo_jax.models import llada, lora

  root = Path(__file__).resolve().parents[2]
  out = tmp_path / "plan.json"
  p = subprocess.run([sys.executable, "-m", "bgpo_jax.benchmarks.memory", "--plan-8b",
                      "--config=configs/math.py:lora", "--devices", "1", "--plan-n-layers", "2",
                      "--config.rl.updates_per_batch=2", "--out", str(out)],
                     cwd=root, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  step, terms, sampler = json.loads(out.read_text())
  assert [r["what"] for r in (step, terms, sampler)] == ["train_step", "old_terms", "sampler"]
  cfg = llada.LLaDAConfig.preset("llada_8b", n_layers=2)
  spec = lora.LoraSpec(r=128, alpha=64.0, targets=("q_proj", "k_proj", "v_proj", "up_proj"))
  adapters = sum(a * b * c for ab in lora.adapter_shapes(cfg, spec).values() for a, b, c in ab.values())
  base = 2 * cfg.num_params()  # bfloat16
  for r in (step, terms, sampler):
    assert r["lora_rank"] == 128 and r["trainable_params"] == adapters and r["params"] == cfg.num_params()
    assert r["cpu_stand_in_bytes"] == base  # float32 stand-ins, counted at bf16's 2 bytes
  # The step's arguments: the base, the adapters with both AdamW moments (and the batch).
  state = base + 3 * 4 * adapters
  assert state <= step["argument_bytes"] <= state + 2**24
  # No float32 copy of the base in any temp (it alone would be 2 x base).
  assert max(r["temp_bytes"] for r in (step, terms, sampler)) < 2 * base
  assert 0 <= terms["resident_opt_state_bytes"] - 2 * 4 * adapters <= 64  # both moments (+ step counts)
  # Unmerged (the variant's lora.sampler_weights): base + adapters are its arguments, nothing else
  # resident but the moments; calls of 8 rows (rollout.batch_size).
  assert sampler["rows"] == 8 and sampler["resident_lora_bytes"] == 0
  assert base <= sampler["argument_bytes"] <= base + 4 * adapters + 2**24
  assert "of_40GB" not in step and "of_40GB" in p.stdout


@pytest.mark.slow  # a subprocess compiling on 4 fake devices
def test_plan_dream_config_plans_dream_7b(tmp_path):
  """configs/dream_math.py plans Dream-7B (model.family=dream: its preset, QKV biases, GQA 28/4,
  152k vocab), dual-cache sampler included; a 2-layer Dream-7B on 4 fake devices."""
  import json
  import subprocess
  import sys
  from pathlib import Path

  from bgpo_jax.models import dream

  root = Path(__file__).resolve().parents[2]
  out = tmp_path / "plan.json"
  p = subprocess.run([sys.executable, "-m", "bgpo_jax.benchmarks.memory", "--plan-8b",
                      "--config=configs/dream_math.py", "--devices", "4", "--plan-n-layers", "2",
                      "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  step, sampler = json.loads(out.read_text())
  want = dream.DreamConfig.preset("dream_7b", n_layers=2).num_params()
  for r in (step, sampler):
    assert r["model"] == "dream_7b" and r["n_layers"] == 2 and r["params"] == want
    assert r["prompt_len"] + r["gen_length"] == 1024 and r["mesh"] == [1, 4, 1]
  assert step["argument_bytes"] >= 3 * 4 * want / 4  # float32 params + AdamW moments, 1/4 each
  assert sampler["what"] == "sampler" and sampler["total_bytes"] > 0
  assert sampler["cache"] == "dual"  # the Dream config's rollouts use the KV-cached sampler


@pytest.mark.slow  # 4 step compiles
def test_espo_grows_with_n_and_its_bgpo_bound_stays_flat():
  """The step does what each objective's form needs: ESPO's authors' form (exp of a mean over the
  samples) holds every sample's graph, its per-sample bound (`espo:bound`) one at a time. A timed
  batch of each spec's own layout also runs (seeds, masks)."""
  cfg = memory.model_config("tiny", remat="full", n_layers=2)
  r = {(spec, n): memory.memory_row(cfg, spec, n, **LENS)["temp_bytes"] for spec in ("espo", "espo:bound")
       for n in (2, 8)}
  assert r["espo:bound", 8] <= 1.02 * r["espo:bound", 2]
  assert r["espo", 8] >= 1.3 * r["espo", 2]


def test_objective_specs_parse_their_hyper_parameters():
  assert memory.step_config("espo:bound", 4, gen_length=32).hparams.bound is True
  s = memory.step_config("spg:logp_estimation=elbo+block_length=8", 2, gen_length=32)
  assert (s.hparams.logp_estimation, s.hparams.block_length) == ("elbo", 8)
  with pytest.raises(ValueError, match="espo has no hyper-parameter"):
    memory.step_config("espo:bogus", 1, gen_length=32)
