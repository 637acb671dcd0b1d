r"""A tiny random LLaDA checkpoint in the Hugging Face layout, to try a recipe before you rent a pod.

  python -m bgpo_jax.tools.tiny_checkpoint DIR [--vocab-size 512 --d-model 64 --n-layers 2 ...]
  python -m bgpo_jax.main --config=configs/countdown.py --workdir=/tmp/run \
      --config.init.checkpoint=DIR --config.task.data_dir=/path/datasets  (+ shrunk lengths)

DIR gets what a real LLaDA-8B-Instruct directory holds and the trainer reads:
- config.json (LLaDA's keys, tiny sizes) and model-00001-of-00001.safetensors +
  model.safetensors.index.json, written by `bgpo_jax.models.hf.save` (bfloat16, as released);
- tokenizer.json: a real byte-level BPE (HF `tokenizers`), trained on a built-in text of the
  tasks' words, so every string encodes (256 byte tokens) and common words are single tokens;
- tokenizer_config.json: LLaDA's bos / eos / pad tokens, added_tokens_decoder and chat template.

LLaDA's special tokens (`<|startoftext|>`, `<|endoftext|>`, `<|mdm_mask|>`, the header tokens,
`<|eot_id|>`) are in the vocabulary by content, but at small ids (0..5), not at LLaDA's ~126k:
a vocabulary that held them at 126080..126348 would need a 126k-row embedding and head, and the
head's logits would dominate every step of a laptop run. Nothing in the framework assumes
LLaDA's numbers: the tokenizer looks special ids up by content (bgpo_jax.tokenizer.HFTokenizer)
and config.json's mask_token_id / eos_token_id / pad_token_id point at the same ids, which
tasks.build_model checks.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

from bgpo_jax import tokenizer as tok_lib

# In this order at ids 0..5 (the BPE trainer places special tokens first).
SPECIAL_TOKENS = (tok_lib.EOS_TOKEN, tok_lib.BOS_TOKEN, tok_lib.MASK_TOKEN, tok_lib.HEADER_START_TOKEN,
                  tok_lib.HEADER_END_TOKEN, tok_lib.EOT_TOKEN)

# LLaDA-8B-Instruct's chat template (its tokenizer_config.json), SPEC section 1.
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")

# Training text for the BPE merges: the words of the shipped tasks' prompts and answers. The
# merges only decide how many tokens a text takes; any byte sequence encodes.
_CORPUS = r"""
system user assistant
Think step by step, then write only the final number inside <answer></answer>.
Think step by step, then write the final answer inside \boxed{}.
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May? The answer is 72.
Find the value of x such that 2x + 3 = 11. Let $f(x) = x^2 + 1$. Compute \frac{1}{2} + \sqrt{3}.
The sum of the angles of a triangle is 180 degrees. What is the remainder when 100 is divided by 7?
Using the numbers [30, 100, 93], create an equation that equals 37. You can use basic arithmetic
operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think>
tags. And return the final equation in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.
Solve the following 4x4 sudoku puzzle. Each row, column and 2x2 box must contain the digits 1 to 4
exactly once. The empty cells are marked with 0. Write the solution as 16 digits in <answer></answer>.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 100 1000 1234 2341 3412 4123
def add(a, b):
    return a + b
def is_palindrome(text: str) -> bool:
    \"\"\"Return True if the text reads the same backwards.\"\"\"
    for i in range(len(text)):
        if text[i] != text[-1 - i]:
            return False
    return True
assert add(1, 2) == 3
You are an expert Python programmer, and here is your task: Write a function to find the
shared elements from the given two lists. Your code should pass these tests: [BEGIN] [DONE]
import math
from typing import List
class Solution:
    def solve(self, nums: List[int]) -> int:
        result = 0
        while nums:
            result += nums.pop()
        return result
"""


def corpus() -> list[str]:
  """The built-in BPE training text, one line per item."""
  return [line for line in _CORPUS.splitlines() if line.strip()]


def build_tokenizer(vocab_size: int = 512):
  """A byte-level BPE `tokenizers.Tokenizer` with LLaDA's special tokens at ids 0..5."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  if vocab_size < 256 + len(SPECIAL_TOKENS):
    raise ValueError(f"vocab_size {vocab_size} cannot hold the 256 byte tokens and "
                     f"{len(SPECIAL_TOKENS)} special tokens; use at least {256 + len(SPECIAL_TOKENS)}")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False, min_frequency=1)
  tok.train_from_iterator(corpus() * 4, trainer=trainer)
  for i, t in enumerate(SPECIAL_TOKENS):
    if tok.token_to_id(t) != i:
      raise AssertionError(f"special token {t!r} got id {tok.token_to_id(t)}, expected {i}")
  return tok


def tokenizer_config() -> dict:
  """tokenizer_config.json in LLaDA's layout, with this tokenizer's special ids."""
  return {
      "add_bos_token": False, "add_eos_token": False,
      "bos_token": tok_lib.BOS_TOKEN, "eos_token": tok_lib.EOS_TOKEN, "pad_token": tok_lib.EOS_TOKEN,
      "chat_template": LLADA_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
      "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast",
      "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True}
                               for i, t in enumerate(SPECIAL_TOKENS)},
  }


def write(path: str | os.PathLike, *, vocab_size: int = 512, d_model: int = 64, n_layers: int = 2,
          n_heads: int = 4, n_kv_heads: int | None = None, mlp_hidden_size: int = 128,
          max_sequence_length: int = 4096, seed: int = 0) -> dict:
  """Writes the checkpoint directory; returns {"path", "params", "vocab_size", special ids}."""
  import jax
  import ml_dtypes
  from bgpo_jax.models import hf, llada

  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  tok = build_tokenizer(vocab_size)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(tokenizer_config(), f, indent=2)
    f.write("\n")
  ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
  vocab = tok.get_vocab_size(with_added_tokens=True)
  cfg = llada.LLaDAConfig(
      d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads or n_heads,
      mlp_hidden_size=mlp_hidden_size, vocab_size=vocab, embedding_size=vocab,
      max_sequence_length=max_sequence_length, mask_token_id=ids[tok_lib.MASK_TOKEN],
      eos_token_id=ids[tok_lib.EOS_TOKEN], pad_token_id=ids[tok_lib.EOS_TOKEN], param_dtype="float32")
  params = llada.init_params(cfg, jax.random.key(seed))
  hf.save(cfg, params, path, dtype=ml_dtypes.bfloat16)  # bfloat16 files, as LLaDA ships them
  return {"path": path, "params": cfg.num_params(), "vocab_size": vocab,
          "mask_token_id": cfg.mask_token_id, "eos_token_id": cfg.eos_token_id}


def main(argv: Sequence[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("path", help="directory to write (created)")
  ap.add_argument("--vocab-size", type=int, default=512)
  ap.add_argument("--d-model", type=int, default=64)
  ap.add_argument("--n-layers", type=int, default=2)
  ap.add_argument("--n-heads", type=int, default=4)
  ap.add_argument("--mlp-hidden-size", type=int, default=128)
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)
  info = write(a.path, vocab_size=a.vocab_size, d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads,
               mlp_hidden_size=a.mlp_hidden_size, seed=a.seed)
  print(f"wrote a random LLaDA checkpoint ({info['params']:,} parameters, vocabulary {info['vocab_size']}, "
        f"mask id {info['mask_token_id']}, eos id {info['eos_token_id']}) to {info['path']}")
  return info


if __name__ == "__main__":
  main()
