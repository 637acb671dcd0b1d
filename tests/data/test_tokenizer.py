"""Tokenizers: LLaDA chat template (SPEC section 1), special ids, decoding, left padding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bgpo_jax.models import llada
from bgpo_jax.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer, read_special_ids

SHARED = Path(__file__).resolve().parents[3] / "shared"
REF_TOKENIZER_CONFIG = SHARED / "reference" / "llada-8b-instruct" / "tokenizer_config.json"

# LLaDA-8B-Instruct ids (SPEC section 1); the test tokenizer places its specials at these ids.
LLADA_IDS = {"<|startoftext|>": 126080, "<|endoftext|>": 126081, "<|mdm_mask|>": 126336,
             "<|start_header_id|>": 126346, "<|end_header_id|>": 126347, "<|eot_id|>": 126348}

CONVERSATION = [
  {"role": "system", "content": "  Be brief.\n"},
  {"role": "user", "content": "What is 2+2?"},
]
SPEC_STRING = ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n")


def _write_tokenizer(path: Path) -> dict[str, int]:
  """A word-level tokenizer (words, punctuation and whitespace runs are tokens) with the LLaDA
  special tokens at LLaDA's ids, plus a tokenizer_config.json in LLaDA's format."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

  words = ["[UNK]", "system", "user", "assistant", "\n\n", " ", "Be", "brief", ".", "What", "is",
           "2", "+", "?", "4"]
  vocab = {w: i for i, w in enumerate(words)}
  vocab.update(LLADA_IDS)
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+|\w+|[^\w\s]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLADA_IDS])
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  cfg = {
    "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in LLADA_IDS.items()},
  }
  (path / "tokenizer_config.json").write_text(json.dumps(cfg))
  return vocab


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  vocab = _write_tokenizer(path)
  return load_tokenizer(path), vocab


def test_hf_chat_template_matches_spec(hf_tok):
  tok, v = hf_tok
  assert tok.render_chat(CONVERSATION) == SPEC_STRING
  ids = tok.apply_chat_template(CONVERSATION)
  hs, he, eot = 126346, 126347, 126348
  want = ([126080, hs, v["system"], he, v["\n\n"], v["Be"], v[" "], v["brief"], v["."], eot,
           hs, v["user"], he, v["\n\n"], v["What"], v[" "], v["is"], v[" "], v["2"], v["+"], v["2"],
           v["?"], eot, hs, v["assistant"], he, v["\n\n"]])
  assert ids == want
  no_prompt = tok.apply_chat_template(CONVERSATION, add_generation_prompt=False)
  assert no_prompt == want[:-4]


def test_hf_special_ids_and_decode(hf_tok):
  tok, v = hf_tok
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id, tok.eot_id, tok.header_start_id,
          tok.header_end_id) == (126080, 126081, 126081, 126336, 126346 + 2, 126346, 126347)
  assert tok.vocab_size == 126349
  assert tok.encode("What is 4?") == [v["What"], v[" "], v["is"], v[" "], v["4"], v["?"]]
  ids = [126336, v["4"], 126336, v["."], 126348, v["What"], 126081]
  assert tok.decode(ids) == "4."  # masks dropped, stops at <|eot_id|>
  assert tok.decode(ids, stop_at_eos=False) == "4.What"
  assert tok.decode([v["4"], 126081, v["4"]]) == "4"


def test_hf_tokenizer_rejects_inconsistent_files(tmp_path):
  _write_tokenizer(tmp_path)
  cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
  cfg["added_tokens_decoder"]["126336"]["content"] = "<|other|>"
  cfg["added_tokens_decoder"]["7"] = {"content": "<|mdm_mask|>"}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="mask token '<\\|mdm_mask\\|>' has id 126336"):
    HFTokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    HFTokenizer(tmp_path / "missing")


def test_reference_tokenizer_config_special_ids():
  if not REF_TOKENIZER_CONFIG.exists():
    pytest.skip(f"shared reference {REF_TOKENIZER_CONFIG} not present")
  ids = read_special_ids(REF_TOKENIZER_CONFIG)
  assert ids == {"bos": 126080, "eos": 126081, "pad": 126081, "mask": 126336, "eot": 126348,
                 "header_start": 126346, "header_end": 126347}
  config = llada.LLaDAConfig.preset("llada_8b")
  assert (config.mask_token_id, config.eos_token_id, config.pad_token_id) == (
    ids["mask"], ids["eos"], ids["pad"])


def test_char_tokenizer_round_trip_and_template():
  tok = CharTokenizer()
  text = "Hello, World! 12+30=42\n\ttab ~"
  ids = tok.encode(text)
  assert ids == [ord(c) for c in text] and max(ids) < tok.vocab_size == 128
  assert tok.decode(ids) == text
  assert tok.encode("é") == [ord("?")]
  chat = tok.apply_chat_template(CONVERSATION)
  assert tok.render_chat(CONVERSATION) == SPEC_STRING
  assert chat[:3] == [tok.bos_id, tok.header_start_id, ord("s")]
  assert chat.count(tok.eot_id) == 2 and chat[-3:] == [tok.header_end_id, 10, 10]
  assert tok.decode(chat, stop_at_eos=False) == "system\n\nBe brief.user\n\nWhat is 2+2?assistant\n\n"
  assert tok.decode(chat, stop_at_eos=False, skip_special_tokens=False) == SPEC_STRING
  # ids match the tiny model preset
  tiny = llada.LLaDAConfig.preset("tiny")
  assert (tiny.vocab_size, tiny.mask_token_id, tiny.eos_token_id, tiny.pad_token_id) == (
    tok.vocab_size, tok.mask_id, tok.eos_id, tok.pad_id)
  assert len({tok.bos_id, tok.eos_id, tok.mask_id, tok.eot_id, tok.header_start_id,
              tok.header_end_id}) == 6
  assert tok.decode([ord("a"), tok.mask_id, ord("b"), tok.eos_id, ord("c")]) == "ab"


def test_pad_left():
  tok = CharTokenizer()
  tokens, mask = tok.pad_left([[65, 66, 67], [68], []])
  np.testing.assert_array_equal(tokens, [[65, 66, 67], [0, 0, 68], [0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1], [0, 0, 0]])
  assert tokens.dtype == np.int32 and mask.dtype == np.int32
  tokens, mask = tok.pad_left([[65]], length=4)
  np.testing.assert_array_equal(tokens, [[0, 0, 0, 65]])
  with pytest.raises(ValueError, match="a sequence has 3 tokens, longer than length 2"):
    tok.pad_left([[1, 2, 3]], length=2)
  assert isinstance(load_tokenizer("char"), CharTokenizer)
