"""Dream's tokenizer from the reference files: special ids by content, Qwen2 BPE ids, and the chat
template against tokenizer_config.json's own jinja template rendered by jinja2."""

import json
import os

import numpy as np
import pytest

from bgpo_jax.tokenizer import DreamTokenizer, HFTokenizer, load_tokenizer

REF = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "reference", "dream-v0-instruct-7b")
pytestmark = pytest.mark.skipif(not os.path.isdir(REF), reason=f"reference files not found at {REF} (../shared absent)")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer in \\boxed{}."}, {"role": "user", "content": "  Solve x + 1 = 3.\n"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 你好"},
     {"role": "user", "content": "Count: 1 2 3\n\n\tdone"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system turn"}],
]


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(REF)


def _jinja_render(messages, add_generation_prompt):
  jinja2 = pytest.importorskip("jinja2")
  from jinja2.sandbox import ImmutableSandboxedEnvironment
  with open(os.path.join(REF, "tokenizer_config.json")) as f:
    template = json.load(f)["chat_template"]
  # The environment transformers renders chat templates with.
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          tools=None)


def test_loader_picks_the_dream_tokenizer_and_special_ids_by_content(tok):
  assert isinstance(tok, DreamTokenizer) and not isinstance(tok, HFTokenizer)
  with open(os.path.join(REF, "added_tokens.json")) as f:
    added = json.load(f)
  assert tok.eos_id == tok.pad_id == added["<|endoftext|>"] == 151643
  assert tok.mask_id == added["<|mask|>"] == 151666
  assert tok.eot_id == added["<|im_end|>"] == 151645
  assert tok.header_start_id == added["<|im_start|>"] == 151644
  assert tok.bos_id == added["<|beginoftext|>"] == 151665
  assert tok.vocab_size == 151667  # 151643 BPE tokens + 24 added; the model's 152064 rows are padding
  with open(os.path.join(REF, "config.json")) as f:
    cfg = json.load(f)
  assert (tok.mask_id, tok.eos_id, tok.pad_id) == (cfg["mask_token_id"], cfg["eos_token_id"], cfg["pad_token_id"])


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_equals_the_jinja_template(tok, i, gen):
  messages = CONVERSATIONS[i]
  want = _jinja_render(messages, gen)
  assert tok.render_chat(messages, add_generation_prompt=gen) == want
  ids = tok.apply_chat_template(messages, add_generation_prompt=gen)
  assert ids == tok.encode(want)
  assert tok.decode(ids, stop_at_eos=False, skip_special_tokens=False) == want


def test_known_qwen2_ids_of_the_default_system_turn(tok):
  # Qwen2's well-known prefix "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n".
  ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
  assert ids[:11] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
  assert ids[-3:] == [151644, 77091, 198]  # "<|im_start|>assistant\n"


def test_bpe_split_pattern_and_merges(tok):
  with open(os.path.join(REF, "vocab.json")) as f:
    vocab = json.load(f)
  # Byte-level pieces: "Ġ" is the space byte; digits are split one by one (\p{N}).
  assert tok.encode("Hello world") == [vocab["Hello"], vocab["Ġworld"]]
  assert tok.encode("12345") == [vocab[d] for d in "12345"]
  # "\s+(?!\S)": of "  hi" the last space goes with the word.
  assert tok.encode("\n\n  hi") == [vocab["ĊĊ"], vocab["Ġ"], vocab["Ġhi"]]
  # Contractions are their own pieces.
  assert tok.encode("don't")[-1] == vocab["'t"]
  for text in ["Ünïcödé ✓ 你好世界 — tabs\tand\nlines", "x^2 + y_1 = \\frac{1}{2}", "<|im_start|> stays one token"]:
    ids = tok.encode(text)
    assert tok.decode(ids, stop_at_eos=False, skip_special_tokens=False) == text
  assert tok.encode("<|mask|>") == [tok.mask_id]


def test_decode_stops_at_turn_end_and_drops_masks(tok):
  ids = tok.encode("The answer is 4.") + [tok.mask_id, tok.eot_id] + tok.encode("junk")
  assert tok.decode(ids) == "The answer is 4."
  tokens, mask = tok.pad_left([[5, 6], [7]])
  np.testing.assert_array_equal(tokens, [[5, 6], [tok.pad_id, 7]])
  np.testing.assert_array_equal(mask, [[1, 1], [0, 1]])
