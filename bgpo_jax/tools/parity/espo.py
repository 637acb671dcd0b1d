"""ESPO parity fixture: runs the authors' own ELBO, forward process and loss (ML-GSAI/ESPO,
espo/espo_trainer.py) on small seeded cases and writes their inputs and outputs as JSON.

Runs under a torch environment (torch + numpy, no jax; of bgpo_jax only parity/authors.py):

  python bgpo_jax/tools/parity/espo.py --repo /path/to/ESPO --out tests/objectives/fixtures/espo.json

(or `python -m bgpo_jax.tools.parity.espo ...`), from the repository root.

`--repo` is a checkout (or an exported tree) of the authors' repository. Their module functions
`forward_process` and `compute_approx_kl` and the `ESPOTrainer` methods `compute_loss`, `_get_elbo`,
`_get_elbo_mc` and `get_logits` are taken from their file with `ast` and run as they are; only what the
class inherits from TRL's trainer (args, step counter, metrics, the model) is stood in for, and
accelerate's `set_seed` is the same three seeding calls on CPU. `compute_loss` hard-codes the k2 KL
estimator; the k1 / k3 cases pass their own `compute_approx_kl` the case's estimator instead.

The stand-in model ignores its input and returns, at call c, logits that are 0 everywhere but at each
response position's target token, where they are a free parameter x[c] (so log p(target) = x -
log(exp(x) + V - 1)). With the complementary pass every MC sample makes two calls (masked, then
complement). The fixture stores x, the masks the authors' forward process drew (perturbed == mask
id), their per-sample ELBOs, the loss and d loss / d x; a test feeds the same x and masks to ours.

It also records the authors' mask counts over many seeds (per-row histograms of k in 0..L, and
the counts a row can reach when the stratified offsets are half-integers), which the test compares
with the formulas of our mask draw.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if not __package__:  # run as a file: the repository root, for the shared helpers below
  sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bgpo_jax.tools.parity import authors

_METHODS = ("compute_loss", "_get_elbo", "_get_elbo_mc", "get_logits")
_FUNCTIONS = ("forward_process", "compute_approx_kl")
MASK_ID = 1000  # outside the stand-in vocabulary


def load_authors(repo: Path) -> dict:
  """The authors' functions and ESPOTrainer methods, executed from their source: a namespace."""
  return authors.load(repo / "espo" / "espo_trainer.py", functions=_FUNCTIONS, cls="ESPOTrainer", methods=_METHODS,
                      extra={"nanmin": authors.nanmin, "nanmax": authors.nanmax})


class _Model:
  """Stands in for LLaDA: call c returns logits = x[c] at each response target token, 0 elsewhere."""

  def __init__(self, x: torch.Tensor, targets: torch.Tensor, vocab: int):
    self.x, self.targets, self.vocab = x, targets, vocab  # x [calls, B, L], targets [B, S]
    self.calls, self.inputs = 0, []
    self.config = types.SimpleNamespace(name_or_path="GSAI-ML/LLaDA-8B-Instruct")

  def __call__(self, input_ids):
    L = self.x.shape[-1]
    self.inputs.append(input_ids.clone())
    xc = self.x[self.calls]
    self.calls += 1
    full = torch.cat([torch.zeros(xc.shape[0], input_ids.shape[1] - L, dtype=xc.dtype), xc], dim=1)
    onehot = F.one_hot(self.targets, self.vocab).to(xc.dtype)  # [B, S, V]
    return types.SimpleNamespace(logits=onehot * full[..., None])


def _trainer(ns: dict, model: _Model, *, num_mc: int, num_iterations: int, beta: float, eps_low: float,
             eps_high: float):
  """A stand-in for the TRL trainer state that compute_loss / _get_elbo read."""
  cls = type("AuthorsESPO", (), {name: ns[name] for name in _METHODS})
  t = cls()
  t.args = types.SimpleNamespace(num_iterations=num_iterations, gradient_accumulation_steps=1)
  t.num_iterations, t.num_mc, t._step = num_iterations, num_mc, 1  # iteration index 0
  t.epsilon_low, t.epsilon_high, t.beta = eps_low, eps_high, beta
  t.processing_class = types.SimpleNamespace(mask_token_id=MASK_ID)
  t.model = model
  t.control = types.SimpleNamespace(should_evaluate=False)
  t.accelerator = types.SimpleNamespace(gather_for_metrics=lambda x: x)
  t._metrics = collections.defaultdict(lambda: collections.defaultdict(list))
  return t


def _masks_of(model: _Model, L: int, num_mc: int, complement: bool) -> np.ndarray:
  """The masked pass's response mask of each MC sample [n, B, L]; checks that the complementary
  pass masks exactly the other response positions and never the prompt."""
  step = 2 if complement else 1
  out = []
  for j in range(num_mc):
    m = (model.inputs[step * j] == MASK_ID)
    assert not m[:, :-L].any(), "the prompt was masked"
    if complement:
      c = (model.inputs[step * j + 1] == MASK_ID)
      assert not c[:, :-L].any() and torch.equal(c[:, -L:], ~m[:, -L:]), "complement pass is not ~mask"
    out.append(m[:, -L:].numpy())
  return np.stack(out)


def run_loss_case(ns: dict, case: dict) -> dict:
  """compute_loss on one case: per-sample ELBOs from the stand-in model, then the loss."""
  B, P, L, V, n = case["B"], case["P"], case["L"], case["V"], case["n"]
  g = torch.Generator().manual_seed(case["seed"])
  targets = torch.randint(0, V, (B, P + L), generator=g)
  x = (torch.randn(2 * n, B, L, generator=g, dtype=torch.float64) * 1.5).float()
  adv = torch.tensor(case["advantages"], dtype=torch.float32)
  seeds = torch.tensor([[list(range(case["seed"] * 10, case["seed"] * 10 + n))]])  # [1, iterations, n]
  mu = 1 if case["on_policy"] else 2

  # The per-sample ELBOs of the current policy (no grad), for the old / reference values.
  m0 = _Model(x, targets, V)
  t0 = _trainer(ns, m0, num_mc=n, num_iterations=mu, beta=case["beta"], eps_low=case["eps_low"],
                eps_high=case["eps_high"])
  with torch.no_grad():
    l = torch.stack([t0._get_elbo(m0, targets[None], L, seeds[0, 0:1, j])[:, 0] for j in range(n)])  # [n, B]
  masks = _masks_of(m0, L, n, complement=True)

  # Old / reference per-sample ELBOs: the current ones shifted so that the sequence log-ratio
  # (mean_j l - mean_j old) / L hits the case's targets (clipping on both sides), plus per-sample
  # noise that cancels in the mean.
  noise = torch.randn(n, B, generator=g, dtype=torch.float64).float()
  noise = noise - noise.mean(0, keepdim=True)
  old = l - L * torch.tensor(case["log_ratio"], dtype=torch.float32)[None] + noise
  ref = l - torch.tensor(case["ref_shift"], dtype=torch.float32)[None] + 0.5 * noise

  xg = x.clone().requires_grad_(True)
  model = _Model(xg, targets, V)
  t = _trainer(ns, model, num_mc=n, num_iterations=mu, beta=case["beta"], eps_low=case["eps_low"],
               eps_high=case["eps_high"])
  orig_kl = ns["compute_approx_kl"]
  ns["compute_approx_kl"] = lambda a, b, est="k1": orig_kl(a, b, case["kl_estimator"])
  try:
    inputs = {"prompt_ids": targets[:, :P], "completion_ids": targets[:, P:], "mask_seeds": seeds,
              "advantages": adv,
              "old_per_token_logps": torch.stack([old.mean(0), old.mean(0)], dim=1),  # [B, iterations]
              "ref_per_token_logps": torch.stack([ref.mean(0), ref.mean(0)], dim=1)}
    loss = t.compute_loss(model, inputs)
  finally:
    ns["compute_approx_kl"] = orig_kl
  loss.backward()
  assert np.array_equal(_masks_of(model, L, n, complement=True), masks), "masks differ between passes"
  return dict(case, x=x.tolist(), masks=masks.astype(int).tolist(), elbo=l.tolist(), old_elbo=old.tolist(),
              ref_elbo=ref.tolist(), loss=float(loss.detach()), grad_x=xg.grad.tolist())


def run_elbo_case(ns: dict, case: dict) -> dict:
  """_get_elbo alone (one MC sample), with or without the complementary pass: ELBO and d ELBO / d x."""
  B, P, L, V = case["B"], case["P"], case["L"], case["V"]
  g = torch.Generator().manual_seed(case["seed"])
  targets = torch.randint(0, V, (B, P + L), generator=g)
  calls = 2 if case["complement"] else 1
  x = (torch.randn(calls, B, L, generator=g, dtype=torch.float64) * 1.5).float().requires_grad_(True)
  model = _Model(x, targets, V)
  t = _trainer(ns, model, num_mc=1, num_iterations=1, beta=0.0, eps_low=0.2, eps_high=0.2)
  l = t._get_elbo(model, targets[None], L, torch.tensor([case["seed"]]), reduce_var=case["complement"])[:, 0]
  l.sum().backward()
  masks = _masks_of(model, L, 1, complement=case["complement"])[0]
  return dict(case, x=x.detach().tolist(), masks=masks.astype(int).tolist(), elbo=l.tolist(),
              grad_x=x.grad.tolist())


def mask_statistics(ns: dict) -> dict:
  """The authors' forward_process over seeds 0..4095 (their mask seeds are randint(0, 2**12)):
  per-row histograms of k for b = 4 rows of L = 7, their p_mask, and the counts a row reaches when
  its stratified offset i (L+1) / b is a half-integer (b = 2, L = 256: the math recipe's micro-batch)."""
  fp = ns["forward_process"]

  def counts(b, L, P=3):
    batch = torch.zeros(b, P + L, dtype=torch.long)
    prompt_index = torch.zeros(P + L, dtype=torch.bool)
    prompt_index[:P] = True
    out, p_ok = [], True
    for s in range(4096):
      noisy, p = fp(batch, prompt_index, MASK_ID, seed=torch.tensor(s))
      k = (noisy[:, P:] == MASK_ID).sum(1)
      p_ok &= bool(torch.allclose(p[:, 0], k.float() / (L + 1))) and not (noisy[:, :P] == MASK_ID).any()
      out.append(k.numpy())
    return np.stack(out), p_ok  # [seeds, b]

  k4, ok4 = counts(4, 7)
  k2, ok2 = counts(2, 256)
  hist = [np.bincount(k4[:, i], minlength=8).tolist() for i in range(4)]
  return {"b": 4, "L": 7, "seeds": 4096, "hist": hist, "p_mask_is_k_over_L_plus_1": ok4 and ok2,
          "half_offset": {"b": 2, "L": 256, "distinct_counts_per_row": [len(set(k2[:, i].tolist())) for i in range(2)]}}


LOSS_CASES = [
    # On-policy (num_iterations 1: old = detached current), no KL: ratio 1, gradient A / L.
    dict(name="on_policy", seed=1, B=4, P=3, L=7, V=11, n=2, on_policy=True, beta=0.0, eps_low=0.2, eps_high=0.2,
         kl_estimator="k2", advantages=[1.0, -0.5, 0.0, 2.0], log_ratio=[0.0] * 4, ref_shift=[0.0] * 4),
    # Off-policy: clipped above (A > 0, r > 1.2), below (A < 0, r < 0.8), inside, A = 0.
    dict(name="clip", seed=2, B=6, P=3, L=7, V=11, n=2, on_policy=False, beta=0.0, eps_low=0.2, eps_high=0.2,
         kl_estimator="k2", advantages=[1.0, -1.0, 0.7, -0.3, 0.0, 1.5], log_ratio=[0.4, -0.5, 0.1, -0.1, 0.3, -0.4],
         ref_shift=[0.0] * 6),
    # The authors' KL (k2), off-policy, asymmetric clip range.
    dict(name="kl_k2", seed=3, B=6, P=3, L=7, V=11, n=2, on_policy=False, beta=0.05, eps_low=0.2, eps_high=0.28,
         kl_estimator="k2", advantages=[1.0, -1.0, 0.7, -0.3, 0.0, 1.5], log_ratio=[0.25, -0.3, 0.1, 0.3, 0.2, -0.1],
         ref_shift=[1.5, -2.0, 0.5, 3.0, -1.0, 0.0]),
    dict(name="kl_k1", seed=4, B=4, P=3, L=7, V=11, n=3, on_policy=False, beta=0.1, eps_low=0.2, eps_high=0.2,
         kl_estimator="k1", advantages=[0.5, -1.0, 1.2, -0.2], log_ratio=[0.1, -0.3, 0.3, 0.05],
         ref_shift=[1.0, -1.5, 0.3, 2.0]),
    dict(name="kl_k3", seed=5, B=4, P=3, L=7, V=11, n=1, on_policy=False, beta=0.1, eps_low=0.2, eps_high=0.2,
         kl_estimator="k3", advantages=[0.5, -1.0, 1.2, -0.2], log_ratio=[0.1, -0.3, 0.3, 0.05],
         ref_shift=[0.8, -1.2, 0.3, 1.5]),
    # Countdown's epsilon 0: clip range [1, 1], one-sided gradients; on-policy the ratio sits on it.
    dict(name="eps0_off_policy", seed=6, B=4, P=3, L=7, V=11, n=2, on_policy=False, beta=0.003, eps_low=0.0,
         eps_high=0.0, kl_estimator="k2", advantages=[1.0, 1.0, -1.0, -1.0], log_ratio=[0.1, -0.1, 0.1, -0.1],
         ref_shift=[0.5, -0.5, 1.0, 0.0]),
    dict(name="eps0_on_policy", seed=7, B=4, P=3, L=7, V=11, n=2, on_policy=True, beta=0.0, eps_low=0.0,
         eps_high=0.0, kl_estimator="k2", advantages=[1.0, -1.0, 0.5, -0.5], log_ratio=[0.0] * 4,
         ref_shift=[0.0] * 4),
]

ELBO_CASES = [dict(name=f"elbo_{c}_{s}", seed=s, B=4, P=2, L=7, V=11, complement=c)
              for c in (True, False) for s in (11, 12)]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repo", type=Path, required=True, help="the authors' ESPO checkout")
  ap.add_argument("--out", type=Path, required=True, help="the JSON fixture to write")
  a = ap.parse_args()
  # Their get_logits runs under autocast('cuda'), which a CPU-only torch disables with a warning.
  warnings.filterwarnings("ignore", message="CUDA is not available")
  ns = load_authors(a.repo)
  try:
    commit = subprocess.run(["git", "-C", str(a.repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
  except (subprocess.CalledProcessError, FileNotFoundError):
    commit = "unknown (not a git checkout)"
  out = {"source": "ML-GSAI/ESPO espo/espo_trainer.py", "commit": commit, "torch": torch.__version__,
         "mask_id": MASK_ID,
         "loss_cases": [run_loss_case(ns, c) for c in LOSS_CASES],
         "elbo_cases": [run_elbo_case(ns, c) for c in ELBO_CASES],
         "mask_stats": mask_statistics(ns)}
  a.out.parent.mkdir(parents=True, exist_ok=True)
  a.out.write_text(json.dumps(authors.rounded(out), separators=(",", ":")) + "\n")
  print(f"wrote {a.out} ({a.out.stat().st_size} bytes; {len(out['loss_cases'])} loss, "
        f"{len(out['elbo_cases'])} ELBO cases; authors' commit {commit})")


if __name__ == "__main__":
  main()
