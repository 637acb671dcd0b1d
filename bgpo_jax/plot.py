"""Learning curves of a run: `python -m bgpo_jax.plot WORKDIR` writes WORKDIR/curves.png.

One row of panels over one shared step axis, the SFT -> RL hand-over marked on each: the SFT loss
(SFT steps only: the RL objective's "loss" is ~0 by construction and says nothing), the RL reward,
the held-out accuracy of every eval task (markers at the evaluated steps only) and the response
length. `make_figure` returns the matplotlib Figure (tests read its data); `plot_run` saves it.
"""

from __future__ import annotations

import io
import json
import re
import sys

from etils import epath

from bgpo_jax.metrics import read_metrics

_EVAL_TASK = re.compile(r"^eval/([^/]+)/accuracy$")


def _series(rows: list[dict], key: str, keep=lambda step: True) -> tuple[list[int], list[float]]:
  """(steps, values) of the rows that hold a finite `key` (a non-finite value is written as a string)."""
  pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float) and keep(r["step"])]
  return [p[0] for p in pts], [p[1] for p in pts]


def _eval_keys(rows: list[dict]) -> list[tuple[str, str]]:
  """(key, legend label) of each eval task's accuracy; the pooled eval/accuracy only when there are
  several tasks (with one it repeats the task's numbers) or none is named."""
  tasks = sorted({m.group(1) for r in rows for k in r if (m := _EVAL_TASK.match(k))})
  keys = [(f"eval/{t}/accuracy", t) for t in tasks]
  if len(tasks) != 1 and any("eval/accuracy" in r for r in rows):
    keys.append(("eval/accuracy", "all tasks" if tasks else "accuracy"))
  return keys


def _infer_sft_steps(rows: list[dict]) -> int:
  """The last logged SFT step (rows with a loss but no reward) when the config is not at hand."""
  if not any("train/reward_mean" in r for r in rows):
    return max((r["step"] for r in rows), default=0)
  return max((r["step"] for r in rows if "train/loss" in r and "train/reward_mean" not in r), default=0)


def make_figure(rows: list[dict], *, title: str, sft_steps: int | None = None, total_steps: int | None = None):
  """The learning-curve Figure of metrics rows (metrics.jsonl). sft_steps: the SFT -> RL hand-over
  step (rows up to it are SFT; None: inferred from the rows); total_steps: the right end of the
  step axis (None: the last row). Raises ValueError when no panel has data."""
  from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
  from matplotlib import transforms

  if sft_steps is None:
    sft_steps = _infer_sft_steps(rows)
  has_rl = any("train/reward_mean" in r for r in rows)
  is_sft = (lambda s: s <= sft_steps) if has_rl else (lambda s: True)
  # (ylabel, panel title, [(key, label, step filter)], evaluation markers only)
  panels = [
      ("SFT loss", "SFT loss", [("train/loss", None, is_sft)], False),
      ("mean reward", "RL reward (train batch)", [("train/reward_mean", None, lambda s: True)], False),
      ("accuracy", "held-out accuracy", [(k, label, lambda s: True) for k, label in _eval_keys(rows)], True),
      ("tokens", "response length", [("train/response_len", None, lambda s: True)], False),
  ]
  panels = [p for p in panels if any(_series(rows, k, keep)[0] for k, _, keep in p[2])]
  if not panels:
    raise ValueError("the metrics have no train/loss, train/reward_mean, eval/.../accuracy or train/response_len "
                     "values")

  steps = [r["step"] for r in rows]
  lo, hi = min(steps + [0]), max(steps + [total_steps or 0, sft_steps])
  pad = max(0.02 * (hi - lo), 0.5)
  fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
  axes = fig.subplots(1, len(panels), sharex=True, squeeze=False)[0]
  for ax, (ylabel, panel_title, series, eval_only) in zip(axes, panels):
    for key, label, keep in series:
      xs, ys = _series(rows, key, keep)
      if not xs:
        continue
      if eval_only:
        # Evaluations are sparse: a line between two of them would claim values never measured.
        line, = ax.plot(xs, ys, ls="none", marker="o", ms=5, label=label)
        # The last value, left of its marker: the right edge of the panel is the run's last step.
        ax.annotate(f"{ys[-1]:.3f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(-5, 5), ha="right",
                    fontsize=8, color=line.get_color())
      else:
        ax.plot(xs, ys, marker="o" if len(xs) <= 40 else None, ms=3, lw=1.2, label=label)
    if eval_only:
      ax.margins(y=0.15)  # room for the last value's label above its marker
      if len(series) > 1:
        ax.legend(fontsize=8, loc="best")
    if sft_steps and has_rl:
      ax.axvline(sft_steps, color="0.35", ls="--", lw=1)
      # Phase names just inside the top corners on each side of the hand-over line.
      tr = transforms.blended_transform_factory(ax.transData, ax.transAxes)
      ax.text(sft_steps - pad, 0.98, "SFT", transform=tr, ha="right", va="top", fontsize=8, color="0.35")
      ax.text(sft_steps + pad, 0.98, "RL", transform=tr, ha="left", va="top", fontsize=8, color="0.35")
    ax.set_title(panel_title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  axes[0].set_xlim(lo - pad, hi + pad)  # shared by every panel (sharex)
  fig.suptitle(title)
  return fig


def run_info(workdir: str) -> dict:
  """WORKDIR/run_config.json (the config the run started with), or {} when there is none."""
  path = epath.Path(workdir) / "run_config.json"
  try:
    return json.loads(path.read_text()) if path.exists() else {}
  except ValueError:
    return {}


def config_title(config, config_name: str | None = None) -> str:
  """"<config file>, seed S", or, when the file is not known, "<task> <objective>, seed S" from the
  config (a ConfigDict or its JSON dict)."""
  get = lambda d, *ks: _dig(d, ks)
  seed = get(config, "seed")
  seed = "" if seed is None else f", seed {seed}"
  if config_name:
    return f"{config_name}{seed}"
  task = get(config, "task", "name") or "run"
  if task == "demo" and get(config, "task", "demo_task"):
    task = f"demo {get(config, 'task', 'demo_task')}"
  what = "SFT" if get(config, "mode") == "sft" else get(config, "rl", "objective") or ""
  return f"{task} {what}".strip() + seed


def _dig(d, keys):
  for k in keys:
    try:
      d = d[k]
    except (KeyError, TypeError, IndexError, AttributeError):
      return None
  return d


def command_line_config_name() -> str | None:
  """The --config file of this program's command line (absl's config flag), or None: a title that
  names the config file is what a reader looks for among many runs."""
  try:
    from absl import flags
    flag = flags.FLAGS["config"]
    name = getattr(flag, "config_filename", None) if flags.FLAGS.is_parsed() else None
  except Exception:  # no such flag: a library call, a test
    return None
  return str(name) if name else None


def _phases(info: dict) -> tuple[int | None, int | None]:
  """(SFT steps, SFT + RL steps) of a recorded config (train/run.Phases), or (None, None)."""
  if "total_steps" not in info:
    return None, None
  total = int(info["total_steps"])
  if info.get("mode") == "sft":
    return total, total
  sft = int(_dig(info, ("sft", "steps")) or 0)
  return sft, sft + total


def plot_run(workdir: str, out: str | None = None, *, title: str | None = None, sft_steps: int | None = None,
             total_steps: int | None = None) -> str:
  """Writes the learning curves of WORKDIR/metrics.jsonl to `out` (default WORKDIR/curves.png);
  returns its path. Title and phase lengths default to WORKDIR/run_config.json's."""
  rows = read_metrics(workdir)
  info = run_info(workdir)
  rec_sft, rec_total = _phases(info)
  fig = make_figure(rows, title=title or (config_title(info) if info else epath.Path(workdir).name),
                    sft_steps=rec_sft if sft_steps is None else sft_steps,
                    total_steps=rec_total if total_steps is None else total_steps)
  out = str(out or epath.Path(workdir) / "curves.png")  # epath: a gs:// workdir gets it too
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  epath.Path(out).write_bytes(buf.getvalue())
  return out


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    raise SystemExit("usage: python -m bgpo_jax.plot WORKDIR")
  print(plot_run(argv[0]))


if __name__ == "__main__":
  main()
