"""One object per process, made on first use (the reward workers and pools are costly to start,
and a task that never needs them should not pay for them)."""

from __future__ import annotations

import functools
import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def process_wide(make: Callable[[], T]) -> Callable[[], T]:
  """Decorator: the function returns the object `make()` made on its first call, every time
  after (thread-safe: grading threads may ask at once)."""
  lock, made = threading.Lock(), []

  @functools.wraps(make)
  def get() -> T:
    with lock:
      if not made:
        made.append(make())
      return made[0]

  return get
