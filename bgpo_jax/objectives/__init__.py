"""RL objectives for masked diffusion LLMs: group advantages, BGPO, VRPO-OL, diffu-GRPO (d1), ESPO,
SPG, coupled-GRPO (DiffuCoder) and wd1, each an `Objective` in the registry (base.py), one module
per objective.

Every objective is a value to MAXIMIZE (the loss is its negative), averaged over the batch of
responses. The math, and how each line here follows from it, is in docs/objectives.md
(SPEC.md section 3 is the contract).

Notation: n Monte-Carlo (MC) samples of the ELBO per response, B responses. For sample j of
response b, `l_new[j, b]` / `l_old[j, b]` are the per-sample ELBO terms under the current and
the old policy computed with the SAME mask (see diffusion/elbo.py), and
`d[j, b] = (l_new - l_old) / L_b` (the division only when lengths are given).

- VRPO-OL:   R    = exp(mean_j d_j) * A.
- BGPO:      R_lb = sum_j g_j,  g_j = (1 + d_j) * A / n  (A >= 0, tangent bound)
                                g_j = exp(d_j) * A / n   (A < 0, Jensen),
             with R_lb <= R always and R_lb == R, grad R_lb == grad R on-policy (all d_j = 0).

`elbo_old`, `logp_old` and `logp_ref` are wrapped in `stop_gradient` here, so the on-policy
case can pass the same array twice (`bgpo_objective(l, l, A)`): the value is then R(d=0) = A
and the gradient is A/n * sum_j grad l_j, exactly as with a separately stored old value.

Adding an objective: a module with an `Objective` subclass and `register(...)` of an instance
(see sft.py, the smallest); import it before the trainer starts (a config file may).
"""

from bgpo_jax.objectives.base import (BATCH_AXIS, COMMON_FIELDS, MC_FIELDS, BatchField, ElboObjective, config_section,
                                      NoHparams, Objective, RolloutInputs, abstract_batch, batch_layout, describe_layout,
                                      get, names, register)
from bgpo_jax.objectives.common import (LOG_RATIO_CAP, _capped_exp, _check_clip, _dual_clip, _float,
                                        _log_ratios, _ppo_clip, group_advantages, k3, log_ratio)
from bgpo_jax.objectives.bgpo import (BGPO, ElboHparams, bgpo_objective, bgpo_sample_terms,
                                      elbo_kl_sample_terms)
from bgpo_jax.objectives.vrpo_ol import VRPO_OL, vrpo_objective
from bgpo_jax.objectives.diffu_grpo import DiffuGRPO, DiffuGRPOHparams, diffu_grpo_objective, sequence_means
from bgpo_jax.objectives.sft import SFT
from bgpo_jax.objectives.wd1 import WD1
from bgpo_jax.objectives.coupled_grpo import CoupledGRPO, coupled_grpo_objective
from bgpo_jax.objectives.espo import ESPO, espo_bound_objective, espo_objective
from bgpo_jax.objectives.spg import SPG, spg_objective
