"""Small lm-evaluation-harness tasks over Python's pydoc corpus, offline: jsonl files + task YAMLs.

    python tools/pydoc_tasks.py --out tasks/pydoc
    python -m trainer.cli eval-harness --model-path runs/demo --tasks pydoc_choice,pydoc_rolling \
        --include-path tasks/pydoc

Three tasks, one per kind of lm-eval request: `pydoc_choice` (multiple choice, acc / acc_norm: which of
four 30-character pieces continues a paragraph), `pydoc_rolling` (loglikelihood_rolling: word and byte
perplexity, bits per byte) and `pydoc_generate` (generate_until a newline, exact_match). They are made
from the corpus the offline demo trains on, so they show eval-harness (and `lm_eval --model hf` on an
export) working without a network, not how good a model is; they are also the tests' local tasks, and
a template for tasks over your own files.
"""
import json
import random
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import click


def pydoc_texts(count: int, chars: int) -> list[str]:
    """The first `count` pydoc topics of at least `chars` characters, cut to `chars` and stripped."""
    from pydoc_data.topics import topics

    texts = [topics[k][:chars].strip() for k in sorted(topics) if len(topics[k]) >= chars]
    return texts[:count]


def write_task(root, name: str, records: list[dict], body: str) -> Path:
    """ROOT/NAME.jsonl (the records) and ROOT/NAME.yaml (a task reading it by absolute path, then `body`)."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                       f"    test: {data}\ntest_split: test\n{body}")
    return root / f"{name}.yaml"


def write_rolling_task(root, name: str, texts: list[str]) -> Path:
    """A loglikelihood_rolling task (word / byte perplexity, bits per byte), one document per text."""
    return write_task(root, name, [{"text": t} for t in texts],
                      "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\nmetric_list:\n"
                      "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")


def write_choice_task(root, name: str, count: int) -> Path:
    """A multiple-choice task (acc, acc_norm): which of four 30-character pieces continues a paragraph."""
    texts = pydoc_texts(count + 3, 120)
    rng = random.Random(0)
    records = []
    for i in range(min(count, len(texts))):
        others = [texts[(i + k) % len(texts)][60:90] for k in (1, 2, 3)]
        label = rng.randrange(4)
        choices = others[:label] + [texts[i][60:90]] + others[label:]
        records.append({"context": texts[i][:60], "choices": choices, "label": label})
    # target_delimiter '': the choices are exact slices of the text, so no space goes between context and choice
    return write_task(root, name, records, "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
                      "doc_to_choice: choices\ndoc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n"
                      "  - metric: acc\n  - metric: acc_norm\n")


def write_generate_task(root, name: str, count: int, max_gen_toks: int = 16) -> Path:
    """A generate_until task (exact_match, stops at a newline): continue a paragraph greedily."""
    texts = pydoc_texts(count, 120)
    records = [{"context": t[:50], "target": t[50:].split("\n")[0]} for t in texts]
    return write_task(root, name, records, "output_type: generate_until\ndoc_to_text: '{{context}}'\n"
                      "doc_to_target: target\ntarget_delimiter: ''\ngeneration_kwargs:\n  until: ['\\n']\n"
                      f"  max_gen_toks: {max_gen_toks}\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the YAML and jsonl files.")
@click.option("--choice", default=60, help="Examples in pydoc_choice.")
@click.option("--rolling", default=8, help="Documents (2,000 characters each) in pydoc_rolling.")
@click.option("--generate", default=10, help="Examples in pydoc_generate.")
def main(out, choice, rolling, generate):
    """Write the pydoc_choice, pydoc_rolling and pydoc_generate tasks for eval-harness --include-path OUT."""
    for path in (write_choice_task(out, "pydoc_choice", choice),
                 write_rolling_task(out, "pydoc_rolling", pydoc_texts(rolling, 2000)),
                 write_generate_task(out, "pydoc_generate", generate)):
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
