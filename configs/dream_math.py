"""Math on Dream-v0-Instruct-7B: GSM8K + MATH train, evaluated on GSM8K and MATH500.

python -m bgpo_jax.main --config=configs/dream_math.py --workdir=DIR \
    --config.init.checkpoint=/path/Dream-v0-Instruct-7B --config.task.data_dir=/path/datasets
`--config=configs/dream_math.py:<objective>`: that objective's published recipe instead (as for
configs/math.py; a recipe's sampler settings, remasking included, replace the ones below).

Settings and where they come from:
- The objective budget is the BGPO paper's math setting (configs/math.py, SPEC section 3): 512
  response tokens, 256 rollout steps (2 tokens per step), greedy 512-step evaluation, block 32,
  n = 16 MC samples, G = 8, 16 prompts per step, lr 5e-7 (full fine-tuning), rollout T = 0.6.
- The confidence rule is "entropy": Dream's README generates with alg="entropy" (alg_temp 0),
  and RL recipes for Dream (e.g. EGSPO, github.com/vishnutez/egspo-dllm-rl, which trains
  Dream-v0-Instruct-7B on GSM8K / MATH with 8 generations per prompt, 256-token completions and
  2 tokens per step) roll it out with a LLaDA-style block sampler; we keep LLaDA's block layout
  (block 32) so the two families are compared under one sampler.
- Dream's chat template: the tokenizer dir (vocab.json + merges.txt) is detected as Dream's and
  renders `<|im_start|>` turns with the default system message; eos = pad = <|endoftext|>,
  `<|im_end|>` ends a turn (stops decoding), mask = <|mask|> (151666).
- Rollouts use the dual KV cache as the other paper configs (Fast-dLLM supports Dream too);
  evaluation samples exactly (eval.cache none).
Not taken over: Dream's README nucleus sampling (top_p 0.95): our sampler has no top-p.
"""

from bgpo_jax.config import paper_config, task_config


def get_config(variant: str = ""):
  c = paper_config("math", gen_length=512, train_steps=256, eval_steps=512, num_mc_samples=16,
                   eval_tasks="gsm8k,math500")
  c.model.family = "dream"
  c.model.preset = "dream_7b"  # overridden by the checkpoint's config.json
  c.rollout.remasking = "entropy"  # also the eval sampler's rule (greedy candidates at T = 0)
  # rollout.cache stays paper_config's "dual" (Fast-dLLM's dual KV cache; Dream's cached window
  # starts one position early for its shifted predictions, models/dream_cache.py); eval exact.
  return task_config(c, variant)
