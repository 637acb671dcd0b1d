"""Code: a user's JSONL of {prompt, tests}, evaluated on HumanEval and MBPP: LLaDA-8B-Instruct with the BGPO paper's settings (SPEC section 3).

python -m bgpo_jax.main --config=configs/code.py --workdir=DIR \
    --config.init.checkpoint=/path/LLaDA-8B-Instruct --config.task.data_dir=/path/datasets
"""

from bgpo_jax.config import paper_config


def get_config():
  # Rollouts with Fast-dLLM's prefix KV cache, exact greedy evaluation (set in paper_config:
  # rollout.cache="prefix", eval.cache="none"; README "Fast rollouts").
  # Required: --config.task.train_file=/path/code_train.jsonl ({prompt, tests} per line).
  return paper_config("code", gen_length=512, train_steps=512, eval_steps=512, num_mc_samples=16,
                      eval_tasks="humaneval,mbpp")
