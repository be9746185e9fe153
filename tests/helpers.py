"""Shared test helpers (imported by test modules; pytest puts tests/ on sys.path)."""
import torch

import models


def random_model(**overrides) -> models.GPT:
    """A tiny byte-level model with norms and biases moved off their init values (so parity sees them),
    in eval mode, the same weights on every call."""
    torch.manual_seed(0)
    model = models.GPT(models.get_config("tiny", vocab_size=257, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p)) if p.dim() == 1 else p.mul_(3.0)
    return model


# ---- local lm-evaluation-harness tasks over the pydoc corpus (offline: jsonl files + task YAMLs) ------

def pydoc_texts(count: int, chars: int) -> list[str]:
    """The first `count` pydoc topics of at least `chars` characters, cut to `chars` and stripped."""
    from pydoc_data.topics import topics

    texts = [topics[k][:chars].strip() for k in sorted(topics) if len(topics[k]) >= chars]
    return texts[:count]


def _write_task(root, name: str, records: list[dict], body: str) -> None:
    import json
    from pathlib import Path

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                       f"    test: {data}\ntest_split: test\n{body}")


def write_rolling_task(root, name: str, texts: list[str]) -> None:
    """A loglikelihood_rolling task (word / byte perplexity, bits per byte), one document per text."""
    _write_task(root, name, [{"text": t} for t in texts],
                "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\nmetric_list:\n"
                "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")


def write_choice_task(root, name: str, count: int) -> None:
    """A multiple-choice task (acc, acc_norm): which of four 30-character pieces continues a pydoc paragraph."""
    import random

    texts = pydoc_texts(count + 3, 120)
    rng = random.Random(0)
    records = []
    for i in range(count):
        others = [texts[(i + k) % len(texts)][60:90] for k in (1, 2, 3)]
        label = rng.randrange(4)
        choices = others[:label] + [texts[i][60:90]] + others[label:]
        records.append({"context": texts[i][:60], "choices": choices, "label": label})
    _write_task(root, name, records, "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
                "doc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def write_generate_task(root, name: str, count: int, max_gen_toks: int = 16) -> None:
    """A generate_until task (exact_match; stops at a newline): continue a pydoc paragraph greedily."""
    texts = pydoc_texts(count, 120)
    records = [{"context": t[:50], "target": t[50:].split("\n")[0]} for t in texts]
    _write_task(root, name, records, "output_type: generate_until\ndoc_to_text: '{{context}}'\n"
                "doc_to_target: target\ngeneration_kwargs:\n  until: ['\\n']\n"
                f"  max_gen_toks: {max_gen_toks}\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
