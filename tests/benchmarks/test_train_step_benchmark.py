"""The train-step benchmark runs on tiny shapes and reports what its table promises."""

import json

from bgpo_jax.benchmarks import train_step


def test_train_step_benchmark_rows(tmp_path):
  out = tmp_path / "ts.json"
  train_step.main(["--batch", "8", "--n", "2", "--prompt-len", "8", "--gen-len", "8", "--micro", "0,4",
                   "--unroll", "1,4", "--repeats", "1", "--out", str(out)])
  rows = json.loads(out.read_text())
  assert [(r["micro"], r["unroll"]) for r in rows] == [(8, 1), (4, 1), (8, 4), (4, 4)]
  for r in rows:
    assert r["step_s"] > 0 and r["compile_s"] > 0 and 0 < r["MFU"], r
    assert r["seq"] == 16 and r["temp_MiB"] > 0
