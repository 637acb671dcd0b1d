"""Code: a user's JSONL of {prompt, tests}, evaluated on HumanEval and MBPP: LLaDA-8B-Instruct with the BGPO paper's settings (SPEC section 3).

python -m bgpo_jax.main --config=configs/code.py --workdir=DIR \
    --config.init.checkpoint=/path/LLaDA-8B-Instruct --config.task.data_dir=/path/datasets
`--config=configs/code.py:<objective>`: that objective's published recipe instead (`diffu_grpo` d1's,
`espo`, `spg`, `coupled_grpo`, `wd1` their authors'; docs/objectives.md).
"""

from bgpo_jax.config import paper_config, task_config


def get_config(variant: str = ""):
  # Rollouts with Fast-dLLM's dual KV cache, exact greedy evaluation (set in paper_config:
  # rollout.cache="dual", eval.cache="none"; README "Fast rollouts").
  # Required: --config.task.train_file=/path/code_train.jsonl ({prompt, tests} per line).
  # BGPO's released recipe: 5 epochs of 112 steps; evaluate and save at every epoch's end.
  c = paper_config("code", gen_length=512, train_steps=512, eval_steps=512, num_mc_samples=16,
                   eval_tasks="humaneval,mbpp", total_steps=5 * 112, eval_every=112, checkpoint_every=56)
  return task_config(c, variant)
