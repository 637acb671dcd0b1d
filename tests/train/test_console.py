"""The progress line: what it shows in SFT and in RL, its per-phase ETA (fake clock), and plain
lines (no carriage returns, no escape codes) when the stream is not a terminal."""

import io

import numpy as np

from bgpo_jax.train import console


class Clock:
  """time.monotonic stand-in: `advance(dt)` before each update."""

  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t

  def advance(self, dt):
    self.t += dt


class Tty(io.StringIO):
  def isatty(self):
    return True


def _progress(stream=None, **kw):
  clock = Clock()
  kw = dict(dict(total=30, start=0, label="sft+rl", sft_end=20, eval_every=(10, 5)), **kw)
  return console.Progress(stream=stream if stream is not None else io.StringIO(), clock=clock, **kw), clock


def _steps(p, clock, steps, phase, dt, evals=None, show=False):
  """Steps `steps` of `phase`, `dt` seconds each plus an evaluation's seconds where `evals` has one."""
  for s in steps:
    e = (evals or {}).get(s)
    clock.advance(dt + (e or 0.0))
    m = {"train/loss": np.float32(0.5), "time/train_s": dt}
    if e is not None:
      m.update({"time/eval_s": e, "eval/accuracy": 0.25})
    p.update(s, phase, m, show=show)


def _lines(p):
  return p.stream.getvalue().splitlines()


RL_ROW = {"train/loss": -1.93e-08, "train/reward_mean": 0.6234, "train/accuracy": 0.41, "train/response_len": 15.5,
          "time/rollout_s": 6.1, "time/reward_s": 0.25, "time/train_s": 3.4}


def test_sft_line_shows_the_loss_and_rl_line_shows_reward_accuracy_length_and_times():
  p, clock = _progress()
  _steps(p, clock, range(1, 10), "sft", 1.0)
  clock.advance(1.0)
  p.update(10, "sft", {"train/loss": 0.51234, "eval/accuracy": 0.375, "time/eval_s": 2.0})
  line = _lines(p)[-1]
  assert line.startswith("sft+rl [") and "10/30 sft" in line
  assert "loss=0.5123" in line and "eval_acc=0.375@10" in line and "reward" not in line
  _steps(p, clock, range(11, 21), "sft", 1.0)
  _steps(p, clock, [21], "rl", 30.0)
  clock.advance(10.0)
  p.update(22, "rl", RL_ROW)
  line = _lines(p)[-1]
  assert "22/30 rl" in line
  assert "reward=0.623 acc=0.410 len=15.5 eval_acc=0.375@10" in line
  assert "time rollout 6.10s reward 0.25s train 3.40s" in line
  assert "loss" not in line and "e-08" not in line  # RL's ~0 objective value says nothing


def test_eta_per_phase_skips_the_compiling_first_step_and_adds_evaluations():
  p, clock = _progress()
  clock.advance(30.0)  # step 1 compiles: left out of the rate
  p.update(1, "sft", {"train/loss": 2.0})
  assert "eta SFT: not yet timed, RL: not yet timed" in _lines(p)[-1]
  _steps(p, clock, range(2, 10), "sft", 1.0)
  _steps(p, clock, [10], "sft", 1.0, evals={10: 3.0}, show=True)
  # 10 SFT steps left at 1 s + the evaluation at step 20 (3 s, the one timed so far); RL unknown.
  assert "eta SFT 13s left (1 s/step), RL: not yet timed" in _lines(p)[-1]
  _steps(p, clock, range(11, 20), "sft", 1.0)
  _steps(p, clock, [20], "sft", 1.0, evals={20: 2.0}, show=True)
  assert "eta SFT done, RL: not yet timed" in _lines(p)[-1]
  # The switch to RL: its first step compiles (30 s), so RL is not yet timed, not "27 s left".
  clock.advance(30.0)
  p.update(21, "rl", RL_ROW)
  assert "eta RL: not yet timed" in _lines(p)[-1]
  clock.advance(10.0)
  p.update(22, "rl", RL_ROW)
  # 8 RL steps at 10 s + evaluations at 25 and 30 at 2 s each (the first evaluation compiled).
  assert "eta RL 1m24s left (10 s/step)" in _lines(p)[-1]
  _steps(p, clock, range(23, 31), "rl", 10.0)
  p.update(30, "rl", RL_ROW)  # a second update at 30: the end
  assert "done in" in _lines(p)[-1]


def test_eta_counts_untimed_evaluations_and_adds_rl_once_timed():
  p, clock = _progress()
  _steps(p, clock, range(1, 6), "sft", 2.0, show=True)
  assert "eta SFT 30s left + 2 evals (2 s/step), RL: not yet timed" in _lines(p)[-1]
  p.step_times["rl"] = [10.0]  # e.g. an RL step timed earlier by this process
  p.eval_times = [4.0]
  clock.advance(2.0)
  p.update(6, "sft", {"train/loss": 1.0})
  # SFT: 14 steps x 2 s + 2 evals x 4 s = 36 s; RL: 10 steps x 10 s + 2 evals x 4 s = 108 s.
  assert "eta SFT 36s left (2 s/step), RL 1m48s left (10 s/step), all 2m24s" in _lines(p)[-1]


def test_evals_due_and_durations():
  p, _ = _progress(eval_every=(10, 5))
  assert [p.evals_due(s, "sft") for s in (0, 9, 10, 19, 20)] == [2, 2, 1, 1, 0]
  assert [p.evals_due(s, "rl") for s in (20, 22, 25, 30)] == [2, 2, 1, 0]
  p, _ = _progress(total=25, sft_end=0, eval_every=(10, 10))
  assert p.evals_due(0, "sft") == 3  # 10, 20 and the last step, 25
  assert [console.duration(s) for s in (27.4, 372, 7380)] == ["27s", "6m12s", "2h03m"]


def test_plain_lines_when_not_a_terminal_and_in_place_on_a_terminal():
  p, clock = _progress()
  _steps(p, clock, range(1, 4), "sft", 1.0, show=True)
  _steps(p, clock, [4], "sft", 1.0)  # not a logged step: timed, not shown
  out = p.stream.getvalue()
  assert len(out.splitlines()) == 3 and out.endswith("\n")
  assert "\r" not in out and "\x1b" not in out
  p, clock = _progress(stream=Tty(), total=3, sft_end=0)
  _steps(p, clock, range(1, 4), "sft", 1.0, show=True)
  out = p.stream.getvalue()
  assert out.count("\r") == 3 and out.endswith("\n") and out.count("\n") == 1 and "\x1b" not in out
