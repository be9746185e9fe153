"""Tokenizers: one interface, exact GPT-2 BPE offline, and end-of-text text that never crashes encoding."""
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.data.tokenizer import ENDOFTEXT, get_tokenizer
from trainer.errors import UserError

REPO = Path(__file__).resolve().parent.parent
TEXT = "Hello, world! Ünïcödé and emoji 🚀\n\n  indented\tcode()"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tools.train_tokenizer import train

    out = tmp_path_factory.mktemp("tok")
    return {"bpe": train("pydoc", "bpe", 600, out / "bpe"), "sp": train("pydoc", "sentencepiece", 600, out / "sp")}


def test_gpt2_matches_the_published_encoding():
    tok = get_tokenizer("gpt2")
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's ids, as in every GPT-2 reproduction
    assert tok.decode(tok.encode(TEXT)) == TEXT


@pytest.mark.parametrize("spec_key", ["gpt2", "bytes", "bpe", "sp"])
def test_round_trip_and_endoftext_as_plain_text(spec_key, trained):
    spec = trained.get(spec_key, spec_key)
    tok = get_tokenizer(spec)
    assert tok.spec == spec
    assert tok.decode(tok.encode(TEXT)) == TEXT
    ids = tok.encode(f"a {ENDOFTEXT} b </s>")
    assert tok.eot_id not in ids  # text never injects a document boundary
    assert tok.encode_batch(["one", "two"]) == [tok.encode("one"), tok.encode("two")]


def test_bytes_tokenizer_is_utf8():
    tok = get_tokenizer("bytes")
    assert tok.encode("é") == [0xC3, 0xA9] and (tok.vocab_size, tok.eot_id) == (257, 256)


def test_unknown_spec_lists_valid_forms():
    with pytest.raises(UserError, match="gpt2, bytes, hf:PATH"):
        get_tokenizer("gpt4")
    with pytest.raises(UserError, match="not found"):
        get_tokenizer("hf:/no/such/dir")


def hf_texts() -> list[str]:
    from pydoc_data.topics import topics

    tricky = [TEXT, "", " leading space", "trailing  ", "\n\nnewlines\n", "a  b   c\t\td", "中文 ﬁ ① \x00\x7f",
              f"two documents{ENDOFTEXT}joined by text", f"a {ENDOFTEXT} b </s> <s> <unk>"]
    return tricky + [topics[k] for k in sorted(topics)[:40]]


@pytest.mark.parametrize("spec_key", ["gpt2", "bytes", "bpe", "sp"])
def test_hf_export_encodes_exactly_as_ours(spec_key, trained, tmp_path):
    """AutoTokenizer on the exported files gives our ids for every text (end-of-text strings included, as
    text), decodes them back, knows the model's length and uses our end-of-text as bos and eos."""
    from transformers import AutoTokenizer

    tok = get_tokenizer(trained.get(spec_key, spec_key))
    assert tok.save_hf(tmp_path, model_max_length=64)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    for text in hf_texts():
        ids = tok.encode(text)
        assert hf_tok.encode(text) == ids, text[:60]
        assert hf_tok(text)["input_ids"] == ids  # the call pipelines and lm-eval make
        assert hf_tok.decode(ids) == tok.decode(ids)
    assert hf_tok.model_max_length == 64
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == tok.eot_id


def test_train_tokenizer_cli_prints_the_spec(tmp_path):
    proc = subprocess.run([sys.executable, "tools/train_tokenizer.py", "--source", "pydoc", "--kind", "bpe",
                           "--vocab-size", "400", "--out", str(tmp_path / "t")], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"hf:{tmp_path / 't'}" in proc.stdout
