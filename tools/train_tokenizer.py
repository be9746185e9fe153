"""Train a tokenizer on your own text: byte-level BPE (HF `tokenizers`) or SentencePiece BPE.

    python tools/train_tokenizer.py --source 'corpus/*.txt' --kind bpe --vocab-size 32000 --out tok/
    python tools/convert_shards.py --source 'corpus/*.txt' --tokenizer hf:tok/ --out data/mine

The output is a tokenizer spec the rest of the project accepts: `hf:OUT` (bpe) or
`sp:OUT/tokenizer.model` (sentencepiece); it is printed at the end.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import click

from trainer.data.sources import SPEC_HELP, iter_documents
from trainer.data.tokenizer import ENDOFTEXT, get_tokenizer
from trainer.errors import UserError, describe


def train_bpe(documents, vocab_size: int, out: Path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    return f"hf:{out}"


def train_sentencepiece(documents, vocab_size: int, out: Path) -> str:
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(documents), model_prefix=str(out / "tokenizer"),
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
                                   character_coverage=0.9995, pad_id=-1, unk_id=0, bos_id=1, eos_id=2,
                                   max_sentence_length=1 << 20, minloglevel=2,
                                   # lossless: keep every space and newline, so decode(encode(text)) == text
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=False, allow_whitespace_only_pieces=True)
    return f"sp:{out / 'tokenizer.model'}"


def train(source: str, kind: str, vocab_size: int, out, text_field: str = "text") -> str:
    documents = list(iter_documents(source, text_field))
    if not documents:
        raise UserError(f"source '{source}' has no text to train a tokenizer on")
    if kind == "sentencepiece":
        # SentencePiece learns from "sentences"; paragraphs keep newlines inside pieces' contexts.
        documents = [para for doc in documents for para in doc.split("\n\n") if para.strip()]
    trainer = train_bpe if kind == "bpe" else train_sentencepiece
    try:
        spec = trainer(documents, vocab_size, Path(out))
    except RuntimeError as e:  # sentencepiece reports e.g. a vocabulary too large for the text
        raise UserError(f"tokenizer training failed: {describe(e)}")
    get_tokenizer.cache_clear()
    get_tokenizer(spec)  # prove the spec loads
    return spec


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--source", required=True, help=f"Text to learn from: {SPEC_HELP}.")
@click.option("--kind", type=click.Choice(["bpe", "sentencepiece"]), default="bpe", help="Tokenizer type.")
@click.option("--vocab-size", type=click.IntRange(min=260), default=32000, help="Vocabulary size.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--text-field", default="text", help="Field holding the text in jsonl / parquet / HF datasets.")
def main(source, kind, vocab_size, out, text_field):
    """Train a BPE or SentencePiece tokenizer and print its tokenizer spec."""
    spec = train(source, kind, vocab_size, out, text_field)
    tok = get_tokenizer(spec)
    click.echo(f"tokenizer spec: {spec}  (vocab {tok.vocab_size}, end-of-text id {tok.eot_id})")


if __name__ == "__main__":
    main()
