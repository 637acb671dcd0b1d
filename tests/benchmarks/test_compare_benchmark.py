"""The objective comparison runs end to end on a shrunk demo and reports before/after per seed."""

import os

import numpy as np
import pytest

from bgpo_jax.benchmarks import compare
from bgpo_jax.metrics import read_metrics


def _shrink(c):
  c.model.n_layers = 2
  c.task.demo_train_size = 200
  c.task.demo_test_size = 8
  c.sft.batch_size = 8
  c.sft.micro_batch_per_device = 0
  c.rl.micro_batch_per_device = 0
  c.rl.prompts_per_step = 2
  c.rl.group_size = 4
  c.eval.num_examples = 8
  c.eval.batch_size = 8


@pytest.mark.slow  # SFT, then two objectives x two seeds of RL and evaluation, end to end
def test_compare_records_and_summary(tmp_path):
  records = compare.run([0, 1], rl_steps=1, sft_steps=2, workdir=str(tmp_path),
                        objectives={"bgpo": 2, "diffu_grpo": 1}, sft_seed=1, overrides=_shrink)
  assert [(r["objective"], r["seed"], r["n"]) for r in records] == [
      ("bgpo", 0, 2), ("bgpo", 1, 2), ("diffu_grpo", 0, 1), ("diffu_grpo", 1, 1)]
  for r in records:
    # "before" is the RL run's own step-0 evaluation, not its final one (the demo config skips
    # the step-0 evaluation; the comparison must switch it back on).
    assert 0.0 <= r["acc_before"] <= 1.0 and 0.0 <= r["acc_after"] <= 1.0, r
    assert r["temp_bytes"] > 0 and r["wall_s"] > 0, r
    rows = read_metrics(os.path.join(str(tmp_path), f"{r['objective']}_s{r['seed']}"))
    assert [x["step"] for x in rows if "eval/accuracy" in x] == [0, 1]
  # Both objectives start from the same SFT checkpoint and evaluate the same test set per seed.
  by = {(r["objective"], r["seed"]): r for r in records}
  for s in (0, 1):
    assert by[("bgpo", s)]["acc_before"] == by[("diffu_grpo", s)]["acc_before"]
  table = compare.summarize(records)
  assert [t["objective"] for t in table] == ["bgpo", "diffu_grpo"]
  bgpo = table[0]
  after = [by[("bgpo", s)]["acc_after"] for s in (0, 1)]
  assert bgpo["seeds"] == 2 and np.isclose(bgpo["acc_after_mean"], np.mean(after))
  assert bgpo["acc_after_min"] <= bgpo["acc_after_mean"] <= bgpo["acc_after_max"]
