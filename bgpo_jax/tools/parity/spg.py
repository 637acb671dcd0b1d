"""SPG parity fixture: runs the authors' own loss and forward process (facebookresearch/SPG,
spg/spg_trainer.py) on small seeded cases and writes their inputs and outputs as JSON.

Runs under a torch environment (torch + numpy, no jax; of bgpo_jax only parity/authors.py):

  python bgpo_jax/tools/parity/spg.py --repo /path/to/SPG --out tests/objectives/fixtures/spg.json

(or `python -m bgpo_jax.tools.parity.spg ...`), from the repository root.

`--repo` is a checkout (or an exported tree) of the authors' repository. The methods
`compute_loss`, `forward_process`, `get_logits` and `_get_per_seq_logps` of their `SPGTrainer`
are taken from their file with `ast` and run as they are; only what the class inherits from
TRL's trainer (args, step counter, the model) is stood in for, and accelerate's `set_seed` is
the same three seeding calls on CPU.

The stand-in model ignores its input and returns logits that are 0 everywhere but at each
position's target token, where they are a free parameter x (so log p(target) = x - log(exp(x) +
V - 1)). The fixture stores x [n, B, L], the masks the authors' forward process drew
(perturbed == mask id), the loss and d loss / d x; a test feeds the same x and masks to our loss.

It also records statistics of the authors' block-wise mask over many seeds (which block is
partially masked, how many of its tokens, how often clean context tokens are masked), which
the test compares with the formulas our JAX mask draw implements.
"""

from __future__ import annotations

import argparse
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

_METHODS = ("compute_loss", "forward_process", "get_logits", "_get_per_seq_logps")


def load_authors_class(repo: Path):
  """The authors' SPGTrainer methods (`_METHODS`) as a plain class, executed from their source."""
  ns = authors.load(repo / "spg" / "spg_trainer.py", cls="SPGTrainer", methods=_METHODS, extra={"warnings": warnings})
  return type("AuthorsSPG", (), {name: ns[name] for name in _METHODS})


class _Model:
  """Stands in for LLaDA: logits [rows, S, V] = x at each row's target token, 0 elsewhere."""

  def __init__(self, x_rows: torch.Tensor, targets: torch.Tensor, vocab: int):
    self.x, self.targets, self.vocab = x_rows, targets, vocab
    self.inputs = None

  def __call__(self, input_ids, attention_mask=None):
    self.inputs = input_ids.clone()
    onehot = F.one_hot(self.targets, self.vocab).to(self.x.dtype)  # [rows, S, V]
    return types.SimpleNamespace(logits=onehot * self.x[..., None])


def run_case(cls, case: dict) -> dict:
  """One seeded case through the authors' compute_loss; returns the fixture record."""
  g = np.random.default_rng(case["seed"])
  B, P, L, V, n = case["B"], case["P"], case["L"], case["V"], case["n"]
  mask_id = V  # outside the stand-in vocabulary: only compared with, never looked up
  prompt = torch.as_tensor(g.integers(0, V, (B, P)))
  completion = torch.as_tensor(g.integers(0, V, (B, L)))
  prompt_mask = torch.ones(B, P, dtype=torch.long)
  prompt_mask[0, : case.get("pad", 0)] = 0  # a left-padded prompt
  lengths = torch.as_tensor(case["lengths"])
  completion_mask = (torch.arange(L)[None] < lengths[:, None]).int()
  adv = torch.as_tensor(case["advantages"], dtype=torch.float32)
  x = torch.as_tensor(np.round(g.normal(case.get("x_mean", 0.0), case.get("x_std", 2.0), (n, B, L)), 4),
                      dtype=torch.float32)

  self = cls()
  self.args = types.SimpleNamespace(
      num_iterations=1, forward_type="block_random", num_t=n, min_t=case["min_t"], max_t=case["max_t"],
      use_mask_prompt=case["p_mask_prompt"] > 0, p_mask_prompt=case["p_mask_prompt"], block_length=case["block_length"],
      mask_id=mask_id, cfg_scale=0.0, logp_estimation=case["logp_estimation"], eubo_beta=case["eubo_beta"],
      mix_weight=case["mix_weight"])
  self._step, self.beta = 0, 0.0
  self.control = types.SimpleNamespace(should_evaluate=False)

  # Their rows are b * n + j (the [B, n, S] noisy batch viewed as [B n, S]).
  xr = x.permute(1, 0, 2).reshape(B * n, L).clone().requires_grad_(True)
  full = torch.cat([torch.zeros(B * n, P), xr], dim=1)
  targets = torch.cat([prompt, completion], dim=1).repeat_interleave(n, dim=0)
  model = _Model(full, targets, V)
  inputs = {"prompt_ids": prompt, "prompt_mask": prompt_mask, "completion_ids": completion,
            "completion_mask": completion_mask, "mask_seeds": [case["mask_seed"]], "advantages": adv,
            "reward_mask": adv > 0}
  loss = self.compute_loss(model, inputs)
  loss.backward()
  noisy = model.inputs.view(B, n, P + L)
  masked = (noisy == mask_id).permute(1, 0, 2)  # [n, B, S]
  grad = xr.grad.view(B, n, L).permute(1, 0, 2)
  hp = {k: case[k] for k in ("block_length", "min_t", "max_t", "p_mask_prompt", "logp_estimation", "eubo_beta",
                             "mix_weight")}
  return {"name": case["name"], "hparams": hp, "B": B, "P": P, "L": L, "V": V, "n": n,
          "tokens": torch.cat([prompt, completion], 1).tolist(), "prompt_mask": prompt_mask.tolist(),
          "lengths": lengths.tolist(), "advantages": adv.tolist(), "x": x.tolist(),
          "prompt_masks": masked[:, :, :P].int().tolist(), "response_masks": masked[:, :, P:].int().tolist(),
          "loss": float(loss.detach()), "grad_x": grad.tolist()}


CASES = [
    # L = 12 in blocks of 4 (3 blocks); lengths: full, inside block 2, exactly a block, inside block 0.
    dict(name="eubo_mixed", seed=0, mask_seed=7, B=4, P=3, L=12, V=5, n=2, block_length=4, lengths=[12, 7, 4, 2],
         advantages=[0.5, -0.25, 1.0, -1.25], min_t=0.0, max_t=1.0, p_mask_prompt=0.15, logp_estimation="eubo",
         eubo_beta=1.5, mix_weight=0.5, pad=1),
    dict(name="mix_mixed", seed=1, mask_seed=11, B=4, P=3, L=12, V=5, n=2, block_length=4, lengths=[12, 9, 5, 1],
         advantages=[-0.5, 0.75, -1.0, 0.75], min_t=0.0, max_t=1.0, p_mask_prompt=0.15, logp_estimation="mix",
         eubo_beta=1.5, mix_weight=0.5),
    dict(name="elbo_mixed", seed=2, mask_seed=5, B=4, P=3, L=12, V=5, n=3, block_length=4, lengths=[12, 11, 6, 3],
         advantages=[0.25, -0.75, -0.5, 1.0], min_t=0.0, max_t=1.0, p_mask_prompt=0.15, logp_estimation="elbo",
         eubo_beta=1.5, mix_weight=0.5),
    dict(name="zero_mixed", seed=3, mask_seed=9, B=4, P=3, L=12, V=5, n=2, block_length=4, lengths=[10, 12, 4, 8],
         advantages=[1.0, -1.0, 0.5, -0.5], min_t=0.0, max_t=1.0, p_mask_prompt=0.15, logp_estimation="zero",
         eubo_beta=1.5, mix_weight=0.5),
    dict(name="eubo_beta1_no_prompt_mask", seed=4, mask_seed=3, B=4, P=3, L=12, V=5, n=3, block_length=4,
         lengths=[12, 12, 5, 9], advantages=[-1.0, -0.5, 0.5, 1.0], min_t=0.0, max_t=1.0, p_mask_prompt=0.0,
         logp_estimation="eubo", eubo_beta=1.0, mix_weight=0.5),
    dict(name="mix_beta2_w03_t_range", seed=5, mask_seed=13, B=4, P=3, L=16, V=5, n=2, block_length=8,
         lengths=[16, 13, 8, 6], advantages=[-0.75, 0.25, -0.25, 0.75], min_t=0.25, max_t=0.75, p_mask_prompt=0.3,
         logp_estimation="mix", eubo_beta=2.0, mix_weight=0.3),
    dict(name="eubo_all_negative_and_zero", seed=6, mask_seed=17, B=4, P=3, L=12, V=5, n=2, block_length=4,
         lengths=[12, 6, 3, 11], advantages=[-1.0, -0.5, 0.0, -0.25], min_t=0.0, max_t=1.0, p_mask_prompt=0.15,
         logp_estimation="eubo", eubo_beta=1.5, mix_weight=0.5),
    dict(name="mix_all_positive_one_sample", seed=7, mask_seed=19, B=4, P=3, L=12, V=5, n=1, block_length=4,
         lengths=[12, 2, 7, 10], advantages=[0.25, 0.5, 1.0, 0.75], min_t=0.0, max_t=1.0, p_mask_prompt=0.15,
         logp_estimation="mix", eubo_beta=1.5, mix_weight=0.5),
    dict(name="eubo_confident_tokens", seed=8, mask_seed=23, B=4, P=3, L=12, V=5, n=3, block_length=4,
         lengths=[12, 10, 8, 12], advantages=[-1.0, 1.0, -0.5, 0.5], min_t=0.0, max_t=1.0, p_mask_prompt=0.15,
         logp_estimation="eubo", eubo_beta=1.5, mix_weight=0.5, x_mean=4.0, x_std=3.0),
]


def mask_statistics(cls, *, draws: int, seed0: int = 1000, p_mask_prompt: float = 0.15) -> dict:
  """Frequencies of the authors' block_random draws over `draws` seeds, per row length: the
  partially masked block k, the count masked among block k's completion tokens (per k), whether
  the n samples chose distinct blocks, and how often a clean context token (prompt, blocks
  before k) is masked.

  Each seed runs twice, without and with context masking: the authors draw the context mask
  last, so both runs draw the same blocks and partial masks, and their difference is exactly
  the context mask."""
  L, bl, n, P = 16, 4, 3, 5
  lengths = [16, 14, 9, 4, 1]
  B, nb = len(lengths), L // bl
  self = cls()
  completion_mask = (torch.arange(L)[None] < torch.as_tensor(lengths)[:, None]).int()
  prompt_index = torch.zeros(P + L, dtype=torch.bool)
  prompt_index[:P] = True
  batch = torch.zeros(B, P + L, dtype=torch.long)
  block_counts = np.zeros((B, nb), np.int64)
  partial_counts = np.zeros((B, nb, bl + 1), np.int64)  # [row, k, masked tokens in block k's completion part]
  distinct = np.zeros(B, np.int64)  # draws whose n samples chose n distinct blocks
  ctx = {"earlier_masked": 0, "earlier_total": 0, "prompt_masked": 0, "prompt_total": 0, "other_changed": 0}

  def draw(p, seed):
    self.args = types.SimpleNamespace(forward_type="block_random", num_t=n, min_t=0.0, max_t=1.0, block_length=bl,
                                      use_mask_prompt=p > 0, p_mask_prompt=p)
    noisy, _ = self.forward_process(batch, prompt_index, 1, seed=seed, completion_mask=completion_mask)
    return noisy.numpy() == 1  # [B, n, P + L]

  for s in range(draws):
    m0, m1 = draw(0.0, seed0 + s), draw(p_mask_prompt, seed0 + s)
    for b, ln in enumerate(lengths):
      ks = []
      for j in range(n):
        resp = m0[b, j, P:]
        k = next(k for k in range(nb) if resp[k * bl: min((k + 1) * bl, ln)].any())
        ks.append(k)
        block_counts[b, k] += 1
        partial_counts[b, k, int(resp[k * bl: min((k + 1) * bl, ln)].sum())] += 1
        added = m1[b, j] & ~m0[b, j]
        context = np.zeros(P + L, bool)
        context[:P + k * bl] = True
        ctx["other_changed"] += int((m0[b, j] & ~m1[b, j]).sum() + (added & ~context).sum())
        ctx["earlier_masked"] += int(added[P:].sum())
        ctx["earlier_total"] += k * bl
        ctx["prompt_masked"] += int(added[:P].sum())
        ctx["prompt_total"] += P
      distinct[b] += len(set(ks)) == n
  return {"L": L, "block_length": bl, "n": n, "P": P, "lengths": lengths, "draws": draws,
          "p_mask_prompt": p_mask_prompt, "block_counts": block_counts.tolist(),
          "partial_counts": partial_counts.tolist(), "distinct_blocks": distinct.tolist(), "context": ctx}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repo", required=True, type=Path, help="the authors' SPG checkout (or exported tree)")
  ap.add_argument("--out", required=True, type=Path)
  ap.add_argument("--commit", default="", help="the authors' commit (recorded; read from --repo/.git if empty)")
  ap.add_argument("--draws", type=int, default=2000, help="seeds for the mask statistics")
  args = ap.parse_args()
  torch.set_default_dtype(torch.float32)
  cls = load_authors_class(args.repo)
  commit = args.commit
  if not commit and (args.repo / ".git").exists():
    commit = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
  cases = [run_case(cls, c) for c in CASES]
  fixture = {"source": "facebookresearch/SPG spg/spg_trainer.py", "commit": commit, "cases": cases,
             "mask_stats": mask_statistics(cls, draws=args.draws)}
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(authors.rounded(fixture), separators=(",", ":")) + "\n")
  print(f"wrote {args.out}: {len(cases)} loss cases, mask statistics over {args.draws} seeds")


if __name__ == "__main__":
  main()
