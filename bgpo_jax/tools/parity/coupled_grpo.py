"""Coupled-GRPO parity fixture: runs the authors' own per-token log-probs, forward process and
loss (apple/ml-diffucoder, src/open_r1/coupled_grpo.py) on small seeded cases and writes their
inputs and outputs as JSON.

Runs under a torch environment (torch + numpy, no jax; of bgpo_jax only parity/authors.py):

  python bgpo_jax/tools/parity/coupled_grpo.py --repo /path/to/ml-diffucoder \
      --out tests/objectives/fixtures/coupled_grpo.json

(or `python -m bgpo_jax.tools.parity.coupled_grpo ...`), from the repository root.

`--repo` is a checkout (or an exported tree) of the authors' repository. Their module-level
`selective_log_softmax` and the methods `compute_loss`, `forward_process`, `get_logits` and
`_get_per_token_logps` of their `DiffuGRPOTrainer` are taken from their file with `ast` and run
as they are; only what the class inherits from TRL's trainer (args, step counter, metrics, the
accelerator's gather, the model) is stood in for, and accelerate's `set_seed` is the same three
seeding calls on CPU.

The stand-in model ignores its input and returns logits that are 0 everywhere but at each
completion position's target token, where they are a free parameter x (so log p(target) =
x - log(exp(x) + V - 1)); Dream's one-position shift (get_logits drops the last position) is
respected. Per case the fixture stores x [3, B, L] for the three forwards (fully masked
completion, mask m, its complement), the mask m and ratio t the authors' forward process drew,
the old / reference per-token log-probs (the authors' same pipeline on other x), the loss and
d loss / d x; a test feeds the same arrays to our loss.

It also records properties of the authors' mask draw over many seeds (t's range, the pair being
complementary over the completion, the prompt never masked, the weights 1, 1/t, 1/(1 - t), one t
for the whole batch, identical random rows for every gradient-accumulation chunk), which the test
compares with the formulas our JAX mask draw implements.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

if not __package__:  # run as a file: the repository root, for the shared helpers below
  sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bgpo_jax.tools.parity import authors

_FILE = Path("src") / "open_r1" / "coupled_grpo.py"
_METHODS = ("compute_loss", "forward_process", "get_logits", "_get_per_token_logps")
MASK_ID = 99  # any id outside the toy vocabulary's targets


def load_authors_class(repo: Path):
  """The authors' DiffuGRPOTrainer methods (`_METHODS`) and `selective_log_softmax` as a plain
  class, executed from their source."""
  ns = authors.load(repo / _FILE, functions=("selective_log_softmax",), cls="DiffuGRPOTrainer", methods=_METHODS,
                    extra={"random": random, "nanmin": authors.nanmin, "nanmax": authors.nanmax})
  return type("AuthorsCoupledGRPO", (), {name: ns[name] for name in _METHODS})


class _Model:
  """Stands in for Dream: logits [3B, S, V], x at each completion target (shifted one position
  left, as Dream's head predicts token i at position i - 1), 0 elsewhere. x: [3, B, L]."""

  def __init__(self, x: torch.Tensor, targets: torch.Tensor, vocab: int, seq_len: int):
    self.x, self.targets, self.vocab, self.S = x, targets, vocab, seq_len
    self.inputs = []

  def __call__(self, input_ids, attention_mask=None):
    self.inputs.append(input_ids.clone())
    k, B, L = self.x.shape
    assert input_ids.shape == (k * B, self.S), input_ids.shape
    onehot = F.one_hot(self.targets, self.vocab).to(self.x.dtype)  # [B, L, V]
    vals = (onehot[None] * self.x[..., None]).reshape(k * B, L, self.vocab)
    logits = torch.zeros(k * B, self.S, self.vocab, dtype=self.x.dtype)
    logits = torch.cat([logits[:, :self.S - 1 - L], vals, logits[:, self.S - 1:]], dim=1)
    return types.SimpleNamespace(logits=logits)


def _trainer(cls, *, mu: int, ga: int, beta: float, eps_low: float, eps_high: float, step: int):
  t = cls()
  t.args = types.SimpleNamespace(gradient_accumulation_steps=ga, num_iterations=mu)
  t.num_iterations, t.beta, t.epsilon_low, t.epsilon_high, t._step = mu, beta, eps_low, eps_high, step
  t.processing_class = types.SimpleNamespace(mask_token_id=MASK_ID)
  t.control = types.SimpleNamespace(should_evaluate=False)
  t.accelerator = types.SimpleNamespace(gather_for_metrics=lambda v: v)
  t._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
  return t


def _record_forward_process(trainer) -> list:
  """Wraps the instance's forward_process to keep (t, completion mask) of every call."""
  calls, inner = [], trainer.forward_process

  def wrapped(batch, prompt_index, mask_id, seed=None, accumulate=False):
    noisy, weights, mask = inner(batch, prompt_index, mask_id, seed=seed, accumulate=accumulate)
    calls.append({"weights": list(weights), "mask": mask.clone(), "noisy": [x.clone() for x in noisy]})
    return noisy, weights, mask

  trainer.forward_process = wrapped
  return calls


def _logp(x: torch.Tensor, vocab: int) -> torch.Tensor:
  return x - torch.log(torch.exp(x) + (vocab - 1))


def run_case(cls, case: dict) -> dict:
  """One compute_loss call on B rows (one gradient-accumulation chunk)."""
  g = torch.Generator().manual_seed(case["seed"])
  B, P, L, V = case["B"], case["P"], case["L"], case["V"]
  mu, idx = case["mu"], case["itr"]
  prompt = torch.randint(0, V, (B, P), generator=g)
  completion = torch.randint(0, V, (B, L), generator=g)
  lengths = torch.tensor(case["lengths"])
  completion_mask = (torch.arange(L)[None] < lengths[:, None]).int()
  adv = torch.tensor(case["advantages"], dtype=torch.float32)
  x_new = (torch.randn(3, B, L, generator=g) * 1.5 - 1.0).float()
  input_ids = torch.cat([prompt, completion], dim=1)
  S = P + L
  seed = case["mask_seed"]

  def coupled(x):  # the authors' per-token log-probs of the stand-in model for x, no grad
    tr = _trainer(cls, mu=1, ga=1, beta=0.0, eps_low=0.2, eps_high=0.2, step=0)
    with torch.no_grad():
      return tr._get_per_token_logps(_Model(x, completion, V, S), input_ids[None], L, [seed])[:, 0]  # [B, L]

  # Old / reference: the same pipeline and mask seed on perturbed x (compute_loss reads slot
  # `itr` of [B, mu, L]; other slots are never read).
  def slots(x):
    out = torch.full((B, mu, L), float("nan"))
    out[:, idx] = coupled(x)
    return out

  old = slots(x_new + case["old_noise"] * torch.randn(3, B, L, generator=g)) if mu > 1 else None
  ref = slots(x_new + 0.7 * torch.randn(3, B, L, generator=g)) if case["beta"] != 0 else None

  tr = _trainer(cls, mu=mu, ga=1, beta=case["beta"], eps_low=case["eps_low"], eps_high=case["eps_high"],
                step=idx)
  calls = _record_forward_process(tr)
  x = x_new.clone().requires_grad_(True)
  model = _Model(x, completion, V, S)
  inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
            "completion_mask": completion_mask, "mask_seeds": [seed] * mu, "advantages": adv,
            "old_per_token_logps": old, "ref_per_token_logps": ref}
  # The authors' per-token log-probs of x_new, for the record (same call compute_loss makes).
  logps = coupled(x_new)
  loss = tr.compute_loss(model, inputs)
  loss.backward()
  (call,) = calls
  weights = call["weights"]
  t = 1.0 / weights[1]
  mask = call["mask"][:, P:]
  assert torch.equal(call["mask"][:, :P], torch.zeros(B, P, dtype=torch.bool)), "prompt masked"
  return {
      "name": case["name"], "beta": case["beta"], "clip_low": case["eps_low"], "clip_high": case["eps_high"],
      "vocab": V, "x": x_new.tolist(), "mask": mask.int().tolist(), "ratio": t, "weights": weights,
      "response_mask": completion_mask.tolist(), "advantages": adv.tolist(),
      "old_logps": None if old is None else old[:, idx].tolist(),
      "ref_logps": None if ref is None else ref[:, idx].tolist(),
      "authors_logps": logps.tolist(), "loss": float(loss), "grad_x": x.grad.tolist(),
  }


def mask_properties(cls, seeds: range, *, B: int = 4, P: int = 3, L: int = 64) -> dict:
  """Properties of the authors' forward_process over many seeds (see the module docstring)."""
  tr = _trainer(cls, mu=2, ga=2, beta=0.0, eps_low=0.2, eps_high=0.2, step=0)
  batch = torch.arange(B * (P + L)).reshape(B, P + L) % 50
  prompt_index = torch.zeros(P + L, dtype=torch.bool)
  prompt_index[:P] = True
  ts, fracs = [], []
  checks = collections.Counter()
  for s in seeds:
    noisy, w, m = tr.forward_process(batch, prompt_index, MASK_ID, seed=s)
    t = w[1] ** -1
    ts.append(t)
    full, m1, m2 = (x == MASK_ID for x in noisy)
    checks["prompt_never_masked"] += int(not any(x[:, :P].any() for x in (full, m1, m2)))
    checks["full_masks_whole_completion"] += int(bool(full[:, P:].all()))
    checks["pair_is_complement"] += int(bool((m1[:, P:] ^ m2[:, P:]).all()))
    checks["mask_is_returned_mask"] += int(bool(torch.equal(m1, m)))
    checks["weights_1_1/t_1/(1-t)"] += int(w[0] == 1 and abs(w[2] - 1 / (1 - t)) < 1e-12)
    fracs.append(m1[:, P:].float().mean(dim=1).tolist())
    # accumulate=True: one random matrix of B / ga rows repeated for every chunk, same t.
    noisy_a, w_a, m_a = tr.forward_process(batch, prompt_index, MASK_ID, seed=s, accumulate=True)
    checks["accumulate_same_t"] += int(w_a[1] == w[1])
    checks["accumulate_chunks_share_rows"] += int(bool(torch.equal(m_a[: B // 2], m_a[B // 2:])))
    checks["accumulate_chunk_equals_plain_call"] += int(bool(torch.equal(m_a[: B // 2], m[: B // 2])))
  n = len(seeds)
  return {"seeds": n, "L": L, "B": B, "t": ts, "mask_fraction": fracs,
          "checks": {k: v / n for k, v in sorted(checks.items())}}


CASES = (
    # On-policy (num_iterations 1: old = detach), no KL; one response of length 1, a zero advantage.
    dict(name="on_policy", seed=0, B=4, P=3, L=6, V=7, mu=1, itr=0, mask_seed=42, beta=0.0,
         eps_low=0.5, eps_high=0.5, old_noise=0.0, lengths=[6, 1, 4, 3], advantages=[1.2, -0.7, 0.0, -0.5]),
    # On-policy with the KL (compute_loss alone: the authors' generation path needs mu > 1 for it).
    dict(name="on_policy_kl", seed=1, B=3, P=2, L=5, V=6, mu=1, itr=0, mask_seed=7, beta=0.04,
         eps_low=0.5, eps_high=0.5, old_noise=0.0, lengths=[5, 2, 5], advantages=[0.9, -1.1, 0.3]),
    # The published recipe: mu 2, beta 0.01, epsilon 0.5; old far enough off for clipping both ways.
    dict(name="off_policy_recipe", seed=2, B=4, P=3, L=6, V=7, mu=2, itr=1, mask_seed=1234, beta=0.01,
         eps_low=0.5, eps_high=0.5, old_noise=0.8, lengths=[6, 5, 2, 6], advantages=[1.0, -1.0, 0.6, -0.4]),
    # Asymmetric clip (DAPO-style epsilon_high), strong KL.
    dict(name="asymmetric_clip_kl", seed=3, B=4, P=2, L=5, V=6, mu=2, itr=0, mask_seed=4095, beta=0.3,
         eps_low=0.2, eps_high=0.28, old_noise=0.5, lengths=[5, 3, 5, 1], advantages=[-1.3, 0.8, 0.5, 1.1]),
)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--repo", required=True, type=Path, help="checkout of apple/ml-diffucoder")
  ap.add_argument("--out", required=True, type=Path)
  ap.add_argument("--commit", default="", help="the checkout's commit, for an exported tree without .git")
  args = ap.parse_args()
  torch.set_num_threads(1)
  cls = load_authors_class(args.repo)
  commit = args.commit
  if not commit:
    try:
      commit = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
      commit = "unknown"
  out = {"source": f"apple/ml-diffucoder {_FILE}", "commit": commit,
         "cases": [run_case(cls, c) for c in CASES],
         "masks": mask_properties(cls, range(200))}
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(out, separators=(",", ":")) + "\n")
  print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(out['cases'])} cases)")


if __name__ == "__main__":
  main()
