"""The learning-curve figure: panels, labels, the SFT -> RL boundary, evaluated steps only, one
step axis, the title; and the PNG of a workdir (title and phases from its run_config.json)."""

import json

import numpy as np
import pytest

from bgpo_jax import plot

SFT, RL = 20, 10  # SFT steps 1..20, RL steps 21..30
EVAL_STEPS = [0, 10, 20, 25, 30]  # at start, every 10 SFT steps, every 5 RL steps


def _rows(log_every=2, tasks=("sudoku", "countdown")):
  """Rows as the loop writes them: SFT rows hold train/loss, RL rows add the reward, response length
  and timings (and a ~0 loss), evaluated rows hold eval/<task>/accuracy and the pooled eval/accuracy."""
  rows = []
  for s in range(0, SFT + RL + 1):
    r = {"step": s}
    if s and (s % log_every == 0 or s in EVAL_STEPS):
      r["train/loss"] = 3.0 / s if s <= SFT else 1e-9
      if s > SFT:
        r.update({"train/reward_mean": 0.1 + 0.01 * s, "train/response_len": 14.0 + s % 3,
                  "time/rollout_s": 6.0, "time/reward_s": 0.2, "time/train_s": 3.0})
    if s in EVAL_STEPS:
      for i, t in enumerate(tasks):
        r[f"eval/{t}/accuracy"] = 0.01 * s + 0.1 * i
      r["eval/accuracy"] = 0.01 * s + 0.05
    if len(r) > 1:
      rows.append(r)
  return rows


def _line(ax, label):
  [line] = [l for l in ax.get_lines() if l.get_label() == label]
  return line


def _phase_labels(fig):
  return [t.get_text() for ax in fig.axes for t in ax.texts if t.get_text() in ("SFT", "RL")]


def test_figure_panels_boundary_eval_points_shared_x_and_title():
  fig = plot.make_figure(_rows(), title="configs/demo.py, seed 3", sft_steps=SFT, total_steps=SFT + RL)
  axes = fig.axes
  titles = [ax.get_title() for ax in axes]
  assert titles == ["SFT loss", "RL reward (train batch)", "held-out accuracy", "response length"]
  assert all(ax.get_ylabel() and ax.get_xlabel() == "step" for ax in axes)
  xlim = axes[0].get_xlim()
  assert all(ax.get_xlim() == xlim for ax in axes) and xlim[0] <= 0 and xlim[1] >= SFT + RL
  for ax in axes:  # the hand-over: a vertical line at step 20 with "SFT" on its left, "RL" on its right
    assert any(list(l.get_xdata()) == [SFT, SFT] for l in ax.get_lines())
    texts = {t.get_text(): t.get_position()[0] for t in ax.texts}
    assert texts["SFT"] < SFT < texts["RL"]
  # The SFT loss panel holds SFT steps only (the RL rows' ~0 loss is left out).
  [loss] = axes[0].get_lines()[:1]
  assert max(loss.get_xdata()) == SFT and min(loss.get_ydata()) > 0.1
  assert min(axes[1].get_lines()[0].get_xdata()) == SFT + 2
  # Every eval task (and the pooled accuracy), markers at the evaluated steps only, no line between.
  acc = axes[2]
  for label in ("sudoku", "countdown", "all tasks"):
    line = _line(acc, label)
    assert list(line.get_xdata()) == EVAL_STEPS
    assert line.get_linestyle() == "None" and line.get_marker() == "o"
  np.testing.assert_allclose(_line(acc, "countdown").get_ydata(), [0.01 * s + 0.1 for s in EVAL_STEPS])
  assert fig.get_suptitle() == "configs/demo.py, seed 3"


def test_one_eval_task_is_not_repeated_as_the_pooled_accuracy():
  fig = plot.make_figure(_rows(tasks=("sudoku",)), title="t", sft_steps=SFT)
  acc = fig.axes[2]
  assert [l.get_label() for l in acc.get_lines() if not l.get_label().startswith("_")] == ["sudoku"]


def test_boundary_inferred_and_sft_only_and_rl_only_runs():
  # No config at hand: the last row without a reward is the hand-over.
  fig = plot.make_figure(_rows(), title="t")
  assert any(list(l.get_xdata()) == [SFT, SFT] for l in fig.axes[0].get_lines())
  # SFT only: no boundary, no RL panels.
  sft_rows = [r for r in _rows() if r["step"] <= SFT]
  fig = plot.make_figure(sft_rows, title="t", sft_steps=SFT, total_steps=SFT)
  assert [ax.get_title() for ax in fig.axes] == ["SFT loss", "held-out accuracy"]
  assert not _phase_labels(fig)
  # RL only: no SFT loss panel (the RL loss is ~0), no boundary.
  rl_rows = [dict(r, step=r["step"] - SFT) for r in _rows() if r["step"] > SFT]
  fig = plot.make_figure(rl_rows, title="t", sft_steps=0, total_steps=RL)
  assert [ax.get_title() for ax in fig.axes] == ["RL reward (train batch)", "held-out accuracy", "response length"]
  assert not _phase_labels(fig)
  with pytest.raises(ValueError):
    plot.make_figure([{"step": 1, "time/train_s": 1.0}], title="t")


def test_titles_from_the_config():
  config = {"seed": 2, "mode": "rl", "task": {"name": "demo", "demo_task": "sudoku"}, "rl": {"objective": "bgpo"}}
  assert plot.config_title(config, "configs/demo.py") == "configs/demo.py, seed 2"
  assert plot.config_title(config) == "demo sudoku bgpo, seed 2"
  assert plot.config_title({"seed": 0, "mode": "sft", "task": {"name": "math"}}) == "math SFT, seed 0"
  assert plot.command_line_config_name() is None  # no --config flag in a test process


def test_plot_run_writes_a_png_titled_from_run_config(tmp_path, monkeypatch):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in _rows())
  (tmp_path / "run_config.json").write_text(json.dumps(
      {"seed": 1, "mode": "rl", "total_steps": RL, "sft": {"steps": SFT}, "task": {"name": "gsm8k"},
       "rl": {"objective": "grpo"}}))
  seen = {}
  orig = plot.make_figure

  def spy(rows, **kw):
    seen.update(kw)
    return orig(rows, **kw)

  monkeypatch.setattr(plot, "make_figure", spy)
  out = plot.plot_run(str(tmp_path))
  assert out == str(tmp_path / "curves.png") and (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
  assert seen == {"title": "gsm8k grpo, seed 1", "sft_steps": SFT, "total_steps": SFT + RL}
