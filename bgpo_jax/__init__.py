"""bgpo_jax: RL of masked diffusion LLMs (LLaDA) with Boundary-Guided Policy Optimization.

Data flow, one module per concept:
prompts (data/) -> rollout sampler (rollout.py, diffusion/sampler.py) -> rewards (rewards/)
-> advantages and objectives (objectives/) -> ELBO terms (diffusion/elbo.py)
-> train step (train/) -> checkpoints and metrics (checkpoint.py, metrics.py), joined by main.py.
"""

__version__ = "0.1.0"
