"""Learning curves of a run: `python -m bgpo_jax.plot WORKDIR` writes WORKDIR/curves.png."""

from __future__ import annotations

import io
import sys

from etils import epath

from bgpo_jax.metrics import read_metrics


def plot_run(workdir: str, out: str | None = None) -> str:
  """Reward (train) and accuracy (eval) against step; returns the PNG path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_metrics(workdir)
  out = str(out or epath.Path(workdir) / "curves.png")  # epath: a gs:// workdir gets it too
  panels = [("train/reward_mean", "train reward (mean)"), ("eval/accuracy", "held-out accuracy"),
            ("train/loss", "loss")]
  def informative(key):
    vals = [r[key] for r in rows if isinstance(r.get(key), float)]
    # On-policy RL's loss is exactly zero up to rounding: a flat panel says nothing.
    return vals and (max(vals) - min(vals) > 1e-6 or key != "train/loss")

  panels = [(k, t) for k, t in panels if informative(k)]
  if not panels:
    raise ValueError(f"{workdir}/metrics.jsonl has no train/reward_mean, eval/accuracy or train/loss values")
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
  for ax, (key, title) in zip(axes[0], panels):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float)]
    xs, ys = zip(*pts)
    ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, ms=3)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.suptitle(epath.Path(workdir).name)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  epath.Path(out).write_bytes(buf.getvalue())
  return out


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    raise SystemExit("usage: python -m bgpo_jax.plot WORKDIR")
  print(plot_run(argv[0]))


if __name__ == "__main__":
  main()
