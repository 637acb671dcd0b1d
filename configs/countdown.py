"""Countdown (3 numbers, + - * /): LLaDA-8B-Instruct with the BGPO paper's settings (SPEC section 3).

python -m bgpo_jax.main --config=configs/countdown.py --workdir=DIR \
    --config.init.checkpoint=/path/LLaDA-8B-Instruct --config.task.data_dir=/path/datasets
"""

from bgpo_jax.config import paper_config


def get_config():
  # Rollouts with Fast-dLLM's prefix KV cache, exact greedy evaluation (set in paper_config:
  # rollout.cache="prefix", eval.cache="none"; README "Fast rollouts").
  return paper_config("countdown", gen_length=256, train_steps=128, eval_steps=256, num_mc_samples=16)
