"""Parity fixture for the wd1 objective, from the authors' own code (github.com/xiaohangt/wd1).

Runs under a plain torch environment (torch + numpy, no jax; of bgpo_jax only parity/authors.py):

  python bgpo_jax/tools/parity/wd1.py --repo /path/to/wd1-checkout --out tests/objectives/fixtures/wd1.json

(or `python -m bgpo_jax.tools.parity.wd1 ...`), from the repository root.

--repo is a checkout (or an exported tree) of the authors' repository. The methods needed are cut
out of their trainer files with `ast` and run as they are, bound to a stand-in trainer object:
  - `compute_loss` of RevDiffuGRPOTrainer (wd1/trainers/rev_grpo_trainer.py, the "NP" runs) and of
    RevPSRDiffuGRPOTrainer (rev_grpo_trainer_psr.py, the positive-only "P" runs), with the model's
    `_get_per_token_logps` replaced by a leaf tensor of given token log-probs, so the loss value and
    its gradient w.r.t. those log-probs come from their code;
  - `forward_process` (the one-step mask: prompt tokens masked w.p. p_mask_prompt, the response
    always; accelerate's set_seed as on CPU, and their draw reads only torch's generator): its mask
    statistics;
  - `_get_per_token_logps` with a stand-in model returning fixed logits: which positions and which
    log-softmax entries make the token log-probs.
One compute_loss call holds one prompt's group (per_device_train_batch_size = num_generations = 6 in
wd1/train.yaml, and TRL's sampler puts a group's copies in one device batch); the batch loss is the
mean of the groups' losses (DDP / DeepSpeed average gradients over devices).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

if not __package__:  # run as a file: the repository root, for the shared helpers below
  sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bgpo_jax.tools.parity import authors

NP_FILE = "wd1/trainers/rev_grpo_trainer.py"
P_FILE = "wd1/trainers/rev_grpo_trainer_psr.py"


class Stub:
  """The trainer attributes their methods read."""

  def __init__(self, methods: dict, logps: torch.Tensor | None = None, p_mask_prompt: float = 0.15,
               num_iterations: int = 1, mask_id: int = 126336):
    self._step = 0
    self.args = types.SimpleNamespace(num_iterations=num_iterations, p_mask_prompt=p_mask_prompt,
                                      mask_id=mask_id, cfg_scale=0.0)
    self._logps = logps
    for k, f in methods.items():
      setattr(self, k, types.MethodType(f, self))
    if logps is not None:  # the policy's token log-probs stand in for the model
      self._get_per_token_logps = lambda model, input_ids, logits_to_keep, seeds: self._logps[None]


def group_loss(methods, logps, completion_mask, advantages, prompt_len=3):
  """Their compute_loss on one group: logps [G, L] leaf -> (loss, d loss / d logps)."""
  G, L = logps.shape
  leaf = torch.tensor(logps, dtype=torch.float32, requires_grad=True)
  stub = Stub(methods, logps=leaf)
  inputs = {"prompt_ids": torch.zeros(G, prompt_len, dtype=torch.long),
            "prompt_mask": torch.ones(G, prompt_len, dtype=torch.long),
            "completion_ids": torch.zeros(G, L, dtype=torch.long),
            "completion_mask": torch.tensor(completion_mask, dtype=torch.int32),
            "advantages": torch.tensor(advantages, dtype=torch.float32),
            "mask_seeds": torch.tensor([7])}
  loss = stub.compute_loss(None, inputs)
  loss.backward()
  return float(loss.detach()), leaf.grad.numpy()


def completion_mask_from(lengths, L):
  return (np.arange(L)[None] < np.asarray(lengths)[:, None]).astype(np.int32)


def loss_cases(np_methods, p_methods) -> list[dict]:
  rng = np.random.default_rng(0)
  specs = [
      # (name, variant, G, L, rewards per group, lengths per row)
      ("binary_two_groups", "NP", 4, 6, [[1, 0, 0, 1], [0, 0, 1, 0]], [6, 3, 1, 5, 6, 6, 2, 4]),
      ("all_equal_group", "NP", 4, 5, [[1, 1, 1, 1], [2, 0, 1, 0]], [5, 2, 4, 1, 5, 5, 3, 2]),
      ("gsm8k_like_rewards", "NP", 6, 7, [[0.5, 2.5, 0.125, 3.0, 0.0, 2.625]], [7, 4, 1, 7, 6, 3]),
      ("positive_only_binary", "P", 4, 6, [[1, 0, 0, 1], [0, 0, 1, 0]], [6, 3, 1, 5, 6, 6, 2, 4]),
      ("positive_only_all_equal", "P", 4, 5, [[0, 0, 0, 0]], [5, 2, 4, 1]),
  ]
  cases = []
  for name, variant, G, L, rewards, lengths in specs:
    r = np.asarray(rewards, np.float64)
    # rev_grpo_trainer.py:628-638: advantages = rewards - group mean (no std division).
    adv = (r - r.mean(axis=1, keepdims=True)).reshape(-1)
    B = r.size
    logps = -rng.exponential(1.5, size=(B, L))
    cmask = completion_mask_from(lengths, L)
    methods = np_methods if variant == "NP" else p_methods
    losses, grads = [], []
    for g in range(B // G):
      rows = slice(g * G, (g + 1) * G)
      loss, grad = group_loss(methods, logps[rows], cmask[rows], adv[rows])
      losses.append(loss)
      grads.append(grad)
    num_groups = B // G
    cases.append({
        "name": name, "variant": variant, "negative_weight": 1.0 if variant == "NP" else 0.0,
        "group_size": G, "rewards": r.reshape(-1).tolist(), "advantages": adv.tolist(),
        "lengths": list(lengths), "logp": logps.tolist(), "group_losses": losses,
        # The batch loss: mean over groups (one group per device batch, gradients averaged).
        "loss": float(np.mean(losses)),
        "grad_logp": (np.concatenate(grads, axis=0) / num_groups).tolist()})
  return cases


def mask_facts(methods) -> dict:
  """forward_process: the response always masked, every prompt position (padding included) w.p. p."""
  p, B, P, L, mask_id = 0.15, 64, 40, 8, 126336
  stub = Stub(methods, p_mask_prompt=p)
  batch = torch.randint(0, 1000, (B, P + L))
  batch[:, :5] = 999  # stand-in left padding (the authors pad with EOS and pass no attention mask)
  prompt_index = torch.zeros(P + L, dtype=torch.bool)
  prompt_index[:P] = True
  noisy, p_mask = stub.forward_process(batch, prompt_index, mask_id, seed=123)
  masked = (noisy == mask_id).numpy()
  noisy2, _ = stub.forward_process(batch, prompt_index, mask_id, seed=123)
  noisy3, _ = stub.forward_process(batch, prompt_index, mask_id, seed=124)
  return {"p_mask_prompt": p, "rows": B, "prompt_len": P, "gen_length": L,
          "response_masked_fraction": float(masked[:, P:].mean()),
          "prompt_masked_fraction": float(masked[:, :P].mean()),
          "padding_masked_fraction": float(masked[:, :5].mean()),
          "p_mask_prompt_values": sorted(set(np.round(p_mask[:, :P].numpy().ravel(), 6).tolist())),
          "p_mask_response_values": sorted(set(p_mask[:, P:].numpy().ravel().tolist())),
          "same_seed_same_mask": bool(torch.equal(noisy, noisy2)),
          "other_seed_other_mask": not bool(torch.equal(noisy, noisy3))}


def token_logps_case(methods) -> dict:
  """_get_per_token_logps with a model returning fixed logits: log-softmax at the response positions."""
  B, P, L, V = 2, 3, 4, 7
  gen = torch.Generator().manual_seed(5)
  logits = torch.randn(B, P + L, V, generator=gen)
  tokens = torch.randint(0, V, (B, P + L), generator=gen)
  model = lambda x: types.SimpleNamespace(logits=logits)
  stub = Stub(methods, p_mask_prompt=0.15, mask_id=V - 1)
  out = stub._get_per_token_logps(model, tokens[None], L, [torch.tensor(3)])
  return {"logits": logits.tolist(), "tokens": tokens.tolist(), "gen_length": L, "logps": out[0].tolist()}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--repo", required=True, help="checkout of github.com/xiaohangt/wd1")
  ap.add_argument("--out", required=True, help="fixture JSON to write")
  ap.add_argument("--commit", default="", help="the checkout's commit, recorded (default: git rev-parse in --repo)")
  args = ap.parse_args()
  repo = Path(args.repo)
  np_names = ("compute_loss", "forward_process", "get_logits", "_get_per_token_logps")
  ns = authors.load(repo / NP_FILE, cls="RevDiffuGRPOTrainer", methods=np_names)
  np_methods = {name: ns[name] for name in np_names}
  p_methods = {"compute_loss": authors.load(repo / P_FILE, cls="RevPSRDiffuGRPOTrainer",
                                            methods=("compute_loss",))["compute_loss"]}
  commit = args.commit
  if not commit:
    try:
      commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
      commit = "unknown"
  fixture = {"source": "github.com/xiaohangt/wd1", "commit": commit, "files": [NP_FILE, P_FILE],
             "torch": torch.__version__, "loss_cases": loss_cases(np_methods, p_methods),
             "mask": mask_facts(np_methods), "token_logps": token_logps_case(np_methods)}
  Path(args.out).write_text(json.dumps(fixture, indent=None, separators=(",", ":")) + "\n")
  print(f"wrote {args.out}: {len(fixture['loss_cases'])} loss cases, commit {commit}")


if __name__ == "__main__":
  main()
