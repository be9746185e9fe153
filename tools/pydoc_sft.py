"""Instruction data made from Python's pydoc corpus, offline: a chat jsonl and an Alpaca-style jsonl.

    python tools/pydoc_sft.py --out data/sft
    python -m trainer.cli finetune --init-from runs/demo --data data/sft/pydoc_chat.jsonl --out runs/demo-chat

pydoc_chat.jsonl    {"messages": [{"role": "user", "content": "Explain the topic assert"},
                                  {"role": "assistant", "content": <the topic's first paragraph>}]}
pydoc_alpaca.jsonl  {"instruction": ..., "input": "" or the topic name, "output": <its first sentence>}

One record per pydoc topic (79 with Python 3.11). Made from the corpus the offline demo pretrains on,
they show fine-tuning working without a network (the demo model learns to answer these prompts) and
are the tests' instruction data.
"""
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import click


def first_paragraph(text: str) -> str:
    """The first paragraph of prose in a topic (after its title, past headings, version notes and indented
    grammar or code), its hard line breaks joined."""
    blocks = [b for b in text.strip().split("\n\n") if b.strip()]
    prose = [b.strip() for b in blocks[1:] if not b[0].isspace() and not _heading(b.strip())
             and not b.startswith(("New in version", "Changed in version"))]
    body = (prose or [blocks[0].strip()])[0]
    return " ".join(line.strip() for line in body.splitlines())


def _heading(block: str) -> bool:
    lines = block.splitlines()
    return len(lines) == 2 and set(lines[1].strip()) <= set("=*-~^")


def first_sentence(paragraph: str) -> str:
    head, dot, _ = paragraph.partition(". ")
    return head + "." if dot else paragraph


def chat_records() -> list[dict]:
    from pydoc_data.topics import topics

    return [{"messages": [{"role": "user", "content": f"Explain the topic {name}"},
                          {"role": "assistant", "content": first_paragraph(topics[name])}]} for name in sorted(topics)]


def alpaca_records() -> list[dict]:
    """Half with the topic in the instruction and no input, half with the topic as the input."""
    from pydoc_data.topics import topics

    records = []
    for i, name in enumerate(sorted(topics)):
        answer = first_sentence(first_paragraph(topics[name]))
        if i % 2:
            records.append({"instruction": "Summarize this Python documentation topic in one sentence.",
                            "input": name, "output": answer})
        else:
            records.append({"instruction": f"What does the Python documentation topic '{name}' cover?", "input": "",
                            "output": answer})
    return records


def write_jsonl(path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the two jsonl files.")
def main(out):
    """Write pydoc_chat.jsonl and pydoc_alpaca.jsonl for `finetune --data`."""
    for name, records in (("pydoc_chat.jsonl", chat_records()), ("pydoc_alpaca.jsonl", alpaca_records())):
        click.echo(f"wrote {write_jsonl(Path(out) / name, records)} ({len(records)} records)")


if __name__ == "__main__":
    main()
