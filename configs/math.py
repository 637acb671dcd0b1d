"""Math: GSM8K + MATH train, evaluated on GSM8K and MATH500: LLaDA-8B-Instruct with the BGPO paper's settings (SPEC section 3).

python -m bgpo_jax.main --config=configs/math.py --workdir=DIR \
    --config.init.checkpoint=/path/LLaDA-8B-Instruct --config.task.data_dir=/path/datasets
"""

from bgpo_jax.config import paper_config


def get_config():
  # Rollouts with Fast-dLLM's prefix KV cache, exact greedy evaluation (set in paper_config:
  # rollout.cache="prefix", eval.cache="none"; README "Fast rollouts").
  return paper_config("math", gen_length=512, train_steps=256, eval_steps=512, num_mc_samples=16,
                      eval_tasks="gsm8k,math500")
