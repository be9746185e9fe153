"""eval-hellaswag: completion scoring equals a hand computation on a small fixture written in the
official jsonl format; long contexts are cut from the left; malformed files give one-line errors."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import random_model

import models
from trainer.cli import cli
from trainer.data.tokenizer import get_tokenizer
from trainer.errors import UserError
from trainer.config import HellaSwagConfig
from trainer.eval.evaluate import hellaswag, hellaswag_rows, read_hellaswag, run_hellaswag, score_example
from trainer.eval.modelio import write_tokenizer_spec

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "hellaswag_tiny.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hs") / "model"
    models.save(random_model(block_size=256), path)  # long enough: no example is truncated
    write_tokenizer_spec(path, "bytes")
    return path


def hand_scores(model, ctx: str, ending: str) -> tuple[float, float]:
    """Summed and mean negative log-likelihood of the ending's bytes given the context, by hand."""
    ctx_ids, end_ids = list(ctx.encode("utf-8")), list((" " + ending).encode("utf-8"))
    ids = torch.tensor([ctx_ids + end_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0]
    nll = [-logp[len(ctx_ids) + j - 1, t].item() for j, t in enumerate(end_ids)]
    return sum(nll), sum(nll) / len(nll)


def test_scores_equal_a_hand_computation(model_dir):
    model = models.load(model_dir).eval()
    tok = get_tokenizer("bytes")
    examples = read_hellaswag(FIXTURE)
    correct = correct_norm = 0
    for ex in examples:
        sums, means = score_example(model, tok, ex, "cpu")
        hand = [hand_scores(model, ex.context, e) for e in ex.endings]
        assert sums == pytest.approx([h[0] for h in hand], rel=1e-5)
        assert means == pytest.approx([h[1] for h in hand], rel=1e-5)
        correct += min(range(4), key=lambda i: hand[i][0]) == ex.label
        correct_norm += min(range(4), key=lambda i: hand[i][1]) == ex.label
    result = run_hellaswag(HellaSwagConfig(model_path=str(model_dir), jsonl=str(FIXTURE), progress=False))
    assert result == {**result, "n": 5, "acc": correct / 5, "acc_norm": correct_norm / 5}


def test_a_model_that_knows_the_answers_scores_one():
    """Train the tiny model on the right completions a little: both accuracies must reach 1."""
    torch.manual_seed(0)
    model = models.GPT(models.get_config("tiny", vocab_size=257, block_size=128))
    tok, examples = get_tokenizer("bytes"), read_hellaswag(FIXTURE)
    texts = [list(f"{ex.context} {ex.endings[ex.label]}".encode()) for ex in examples]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        for ids in texts:
            x = torch.tensor([ids])
            loss = F.cross_entropy(model(x[:, :-1])[0], x[0, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    result = hellaswag(model.eval(), tok, examples, "cpu")
    assert result == {"acc": 1.0, "acc_norm": 1.0, "n": 5}


def test_long_context_is_cut_from_the_left():
    tok = get_tokenizer("bytes")
    ex = read_hellaswag(FIXTURE)[0]
    rows, starts = hellaswag_rows(tok, ex, block_size=60)  # endings fit, contexts do not
    for row, start, ending in zip(rows, starts, ex.endings):
        assert len(row) == 61 and bytes(row[start:]).decode() == " " + ending
        assert ex.context.encode().endswith(bytes(row[:start]))


def test_limit_and_cli_json(model_dir):
    out = CliRunner().invoke(cli, ["eval-hellaswag", "--model-path", str(model_dir), "--jsonl", str(FIXTURE),
                                   "--limit", "2", "--no-progress", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output.strip().splitlines()[-1])
    assert result["n"] == 2 and {"acc", "acc_norm"} <= set(result)


@pytest.mark.parametrize("line, message", [
    ('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n{not json', "hs.jsonl:2: not valid JSON"),
    ('{"ctx": "a", "label": 0}', "hs.jsonl:1: missing endings"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', "label 2 is not an index"),
    ('{"ctx": "a", "endings": "b", "label": 0}', "endings a list"),
    ('[1, 2]', "expected a JSON object"),
    ('\n\n', "holds no examples"),
])
def test_malformed_jsonl_is_explained(tmp_path, line, message):
    path = tmp_path / "hs.jsonl"
    path.write_text(line)
    with pytest.raises(UserError, match=message):
        read_hellaswag(path)


def test_cli_errors_are_one_line(model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    for args, message in ((["--jsonl", str(bad)], "bad.jsonl:1: not valid JSON"),
                          (["--jsonl", str(tmp_path / "missing.jsonl")], "no such file")):
        out = CliRunner().invoke(cli, ["eval-hellaswag", "--model-path", str(model_dir), *args])
        assert out.exit_code != 0 and message in out.output and "Traceback" not in out.output
