"""Shared benchmark helpers: timing with compile time counted apart, matmul peak, tables, JSON.

Every benchmark reports achieved FLOP/s as a fraction of this machine's *measured* matmul
peak (MFU), so CPU and GPU numbers read the same way.
"""

from __future__ import annotations

import json
import platform
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


def device_description() -> str:
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", d.platform)
  cpu = platform.processor() or platform.machine()
  return f"{jax.device_count()}x {kind} ({d.platform}; host {cpu}, jax {jax.__version__})"


def block(tree: Any) -> Any:
  return jax.block_until_ready(tree)


def time_jitted(fn: Callable, *args, repeats: int = 3, warmup: int = 1) -> dict:
  """Times a jitted callable: first call (compile + run) apart from the steady-state median.

  Returns {"compile_s", "step_s", "all_s"} where step_s is the median of `repeats` runs.
  """
  t0 = time.perf_counter()
  block(fn(*args))
  first = time.perf_counter() - t0
  for _ in range(max(0, warmup - 1)):
    block(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - t0)
  times.sort()
  step = times[len(times) // 2]
  return {"compile_s": max(first - step, 0.0), "step_s": step, "all_s": times}


_PEAK_CACHE: dict = {}


def matmul_peak_flops(dtype=jnp.float32, size: int | None = None, remeasure: bool = False) -> float:
  """Measured FLOP/s of a large square matmul on the default device (the MFU denominator), from
  its fastest run after a warm-up: a median, or a first run on a cold thread pool, understates
  the peak when other jobs compute beside it (and so overstates MFU; a median once gave half the
  peak here and an MFU above 1). Cached per process; remeasure=True measures again and keeps the
  faster (a benchmark calls it after its timed rows too: on a 2-core EPYC the first measurement
  of a fresh process came out 100 GFLOP/s, later ones 122-129)."""
  key = (jnp.dtype(dtype).name, size)
  if key in _PEAK_CACHE and not remeasure:
    return _PEAK_CACHE[key]
  on_cpu = jax.devices()[0].platform == "cpu"
  n = size or (1024 if on_cpu else 8192)
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  t = time_jitted(f, a, b, repeats=25 if on_cpu else 20, warmup=5)
  peak = max(2.0 * n**3 / min(t["all_s"]), _PEAK_CACHE.get(key, 0.0))
  _PEAK_CACHE[key] = peak
  return peak


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str = "") -> str:
  """Prints rows as an aligned text table (and returns it)."""

  def fmt(v):
    if isinstance(v, float):
      if v == 0:
        return "0"
      if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.3e}"
      return f"{v:.4g}"
    return str(v)

  cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
  lines = []
  if title:
    lines.append(title)
  lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
  lines.append("  ".join("-" * w for w in widths))
  for row in cells:
    lines.append("  ".join(v.rjust(w) for v, w in zip(row, widths)))
  text = "\n".join(lines)
  print(text, flush=True)
  return text


def write_json(path: str | None, records: Any, meta: dict | None = None) -> None:
  """Writes benchmark records; `records` stays a top-level list so tools can read it directly."""
  if not path:
    return
  with open(path, "w") as f:
    json.dump(records, f, indent=1, default=float)
  if meta is not None:
    with open(path + ".meta.json", "w") as f:
      json.dump(meta, f, indent=1, default=str)


def interleaved(calls: list, repeats: int) -> list[dict]:
  """Times jitted calls [(fn, args), ...] round-robin and keeps each one's fastest run: on a
  shared machine, load swings hit all alike and the minimum is the least disturbed."""
  out = []
  for f, a in calls:
    t0 = time.perf_counter()
    block(f(*a))
    out.append({"first_s": time.perf_counter() - t0, "all_s": []})
  for _ in range(repeats):
    for (f, a), rec in zip(calls, out):
      t0 = time.perf_counter()
      block(f(*a))
      rec["all_s"].append(time.perf_counter() - t0)
  for rec in out:
    rec["step_s"] = min(rec["all_s"])
    rec["compile_s"] = max(rec["first_s"] - rec["step_s"], 0.0)
  return out


def save_figure(fig, path: str, title: str | None = None) -> str:
  """Writes a benchmark's matplotlib figure (with `title` above its panels) to `path`, closes it,
  and returns path."""
  import matplotlib.pyplot as plt

  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
