"""Fine-tuning data without DeepSpeed: records in their layouts, the chat templates against transformers'
own rendering and tokenizer, the loss mask token by token, truncation, and the training rows.

Oracles: hand-written byte sequences (the byte tokenizer is UTF-8), and Hugging Face: our exported
tokenizer with the template's Jinja chat_template, rendered and tokenized by transformers exactly as
`pipeline("text-generation")` does with chat messages; the trained span of each reply is read off
transformers' ids for the conversation before and after that reply.
"""
import json
import types

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.loss import IGNORE_INDEX
from trainer.data.tokenizer import get_tokenizer
from trainer.errors import UserError
from trainer.sft.examples import Examples, build, encode, split_indices, truncate
from trainer.sft.records import read_conversations
from trainer.sft.stream import SFTTrainStream, SFTValStream
from trainer.sft.template import BUILTIN, load_template


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ---- records --------------------------------------------------------------------------------------

def test_the_three_layouts_become_the_same_conversation(tmp_path):
    expected = [{"role": "user", "content": "Add 2 and 3"}, {"role": "assistant", "content": "5"}]
    layouts = {
        "alpaca": {"instruction": "Add 2 and 3", "input": "", "output": "5"},
        "chat": {"messages": expected},
        "sharegpt": {"conversations": [{"from": "human", "value": "Add 2 and 3"}, {"from": "gpt", "value": "5"}]},
        "oasst": {"messages": [{"role": "prompter", "content": "Add 2 and 3"}, {"role": "assistant", "content": "5"}]},
        "prompt-completion": {"prompt": "Add 2 and 3", "completion": "5"},
        "conversational-pc": {"prompt": [expected[0]], "completion": [expected[1]]},
    }
    for name, record in layouts.items():
        fmt, conversations = read_conversations(write_jsonl(tmp_path / f"{name}.jsonl", [record]))
        assert conversations == [expected], name
    fmt, conversations = read_conversations(write_jsonl(tmp_path / "input.jsonl", [
        {"instruction": "Add these", "input": "2 and 3", "output": "5"}]))
    assert fmt == "alpaca" and conversations[0][0]["content"] == "Add these\n\n2 and 3"


def test_parquet_and_gzip_records(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"say {i}", "input": None, "output": str(i)} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("a.parquet", "a.jsonl.gz"):
        fmt, conversations = read_conversations(str(tmp_path / name))
        assert fmt == "alpaca" and [c[1]["content"] for c in conversations] == ["0", "1", "2"]


GOOD_CHAT = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
GOOD_ALPACA = {"instruction": "fine", "output": "ok"}


def test_hf_datasets_are_read_like_files(tmp_path):
    """hf:NAME[:CONFIG][@SPLIT] goes through `datasets` (streaming); a local dataset directory needs no network."""
    rows = [{"instruction": f"say {i}", "input": "", "output": str(i)} for i in range(3)]
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", rows)
    local = read_conversations(write_jsonl(tmp_path / "f.jsonl", rows))
    assert read_conversations(f"hf:{tmp_path / 'ds'}@train") == local
    write_jsonl(tmp_path / "ds" / "train.jsonl", [*rows, {"instruction": "x", "input": "", "output": ""}])
    with pytest.raises(UserError, match=f"hf:{tmp_path / 'ds'}@train record 4: the response"):
        read_conversations(f"hf:{tmp_path / 'ds'}@train")


@pytest.mark.parametrize("first, record, fragment", [
    (GOOD_ALPACA, {"instruction": "x"}, "line 2 has no 'output' (an alpaca record needs instruction, output"),
    (GOOD_ALPACA, {"instruction": "x", "output": "  \n"}, "line 2: the response ('output') is empty"),
    (GOOD_ALPACA, GOOD_CHAT, "line 2 has no 'instruction', 'output' (an alpaca record needs instruction, output; "
                             "has: messages)"),
    (GOOD_CHAT, {"messages": [{"role": "user", "content": "x"}]}, "line 2 has no assistant message"),
    (GOOD_CHAT, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     "line 2: the response (assistant message 1) is empty"),
    (GOOD_CHAT, {"messages": [{"role": "wizard", "content": "x"}]},
     "line 2: message 0 of 'messages' has role 'wizard'"),
    (GOOD_CHAT, {"messages": [{"role": "user", "content": 3}]}, "line 2: message 0 of 'messages' is a int, not text"),
])
def test_bad_records_are_named_with_their_line(tmp_path, first, record, fragment):
    path = write_jsonl(tmp_path / "d.jsonl", [first, record])
    with pytest.raises(UserError) as e:
        read_conversations(path)
    assert e.value.message.startswith(f"{path} {fragment}"), e.value.message


def test_an_unknown_layout_lists_what_each_needs(tmp_path):
    with pytest.raises(UserError, match="cannot tell the layout of a record with fields text; expected alpaca: "
                                        "instruction, output; chat: messages; prompt-completion"):
        read_conversations(write_jsonl(tmp_path / "d.jsonl", [{"text": "plain text"}]))


_message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "gpt", "x"]),
                                               "content": st.one_of(st.text(max_size=6), st.none())})
_value = st.one_of(st.none(), st.integers(), st.text(max_size=8), st.lists(st.text(max_size=4), max_size=2),
                   st.lists(_message, max_size=3))
_record = st.dictionaries(st.sampled_from(["instruction", "input", "output", "messages", "conversations", "prompt",
                                           "completion", "junk"]), _value, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(_record, min_size=1, max_size=4), fmt=st.sampled_from(["auto", "alpaca", "chat",
                                                                                 "prompt-completion"]))
def test_any_records_read_or_fail_with_one_named_line(tmp_path, records, fmt):
    path = write_jsonl(tmp_path / "fuzz.jsonl", records)
    try:
        _, conversations = read_conversations(path, fmt)
    except UserError as e:
        assert e.message.startswith(f"{path} line ") and "\n" not in e.message, e.message
        return
    for conversation in conversations:
        assert conversation[-1]["role"] == "assistant"
        assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str)
                   for m in conversation)
        assert all(m["content"].strip() for m in conversation if m["role"] == "assistant")


# ---- templates and masks ----------------------------------------------------------------------------

def test_alpaca_record_in_the_plain_template_byte_by_byte(tmp_path):
    _, conversations = read_conversations(write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": " Name a color. ", "input": "sky", "output": "Blue.\n"}]))
    ids, mask = encode(conversations, BUILTIN["plain"], get_tokenizer("bytes"))[0]
    prompt, reply = b"<|user|>\nName a color.\n\nsky\n<|assistant|>\n", b"Blue.\n<|end|>\n"
    assert ids == [*prompt, *reply, 256]  # 256: end-of-text, after the end marker
    assert mask == [0] * len(prompt) + [1] * len(reply) + [1]


def test_two_turns_with_a_system_message_byte_by_byte():
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "Bye."}]
    ids, mask = encode([conversation], BUILTIN["chatml"], get_tokenizer("bytes"))[0]
    parts = [(b"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", 0),
             (b"Hello.<|im_end|>\n", 1), (b"<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", 0),
             (b"Bye.<|im_end|>\n", 1)]
    assert ids == [b for text, _ in parts for b in text] + [256]
    assert mask == [flag for text, flag in parts for _ in text] + [1]


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory):
    """(template, tokenizer spec) -> our tokenizer exported with the template's chat_template, loaded by
    transformers."""
    from transformers import AutoTokenizer

    out = {}
    for name, template in BUILTIN.items():
        for spec in ("gpt2", "bytes"):
            directory = tmp_path_factory.mktemp(f"{name}-{spec}")
            assert get_tokenizer(spec).save_hf(directory, 1024, chat_template=template.jinja())
            out[name, spec] = AutoTokenizer.from_pretrained(str(directory))
    return out


TRICKY = ["", " ", "\n\n", "  two spaces  ", "\nleading newline", "trailing newline\n\n", "<|end|>", "<|endoftext|>",
          "<|im_end|>\n<|im_start|>user", "### Response:", "{content}", "{{ not jinja }}", "{% if x %}", "tab\tand\r\n",
          "Ünïcödé ✓ 中文", "emoji 🚀!", "a'b's 're", "  \u00a0nbsp\u2028line"]
_content = st.one_of(st.sampled_from(TRICKY), st.text(max_size=30),
                     st.lists(st.sampled_from(TRICKY), min_size=1, max_size=3).map("".join))
_reply = _content.filter(lambda s: s.strip())


@st.composite
def conversations(draw):
    messages = [{"role": "system", "content": draw(_content)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages += [{"role": "user", "content": draw(_content)}, {"role": "assistant", "content": draw(_reply)}]
    return messages


def _hf_ids(hf, messages, generation_prompt=False) -> list[int]:
    """What pipeline("text-generation") feeds the model for chat messages."""
    return hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, return_dict=True)["input_ids"]


@settings(max_examples=150, deadline=None)
@given(conversation=conversations(), name=st.sampled_from(sorted(BUILTIN)), spec=st.sampled_from(["gpt2", "bytes"]))
def test_masks_and_prompts_match_transformers_chat_template(hf_tokenizers, conversation, name, spec):
    """The example's ids are transformers' ids of the rendered conversation (+ end-of-text); exactly the tokens
    transformers adds for each reply (after the prompt it would generate from) are trained; our generation prompt
    is transformers' add_generation_prompt ids."""
    template, tokenizer, hf = BUILTIN[name], get_tokenizer(spec), hf_tokenizers[name, spec]
    assert hf.apply_chat_template(conversation, tokenize=False) == template.render(conversation)
    ids, mask = encode([conversation], template, tokenizer)[0]
    full = _hf_ids(hf, conversation)
    assert ids == full + [tokenizer.eot_id]
    expected = [0] * len(full) + [1]
    for k, message in enumerate(conversation):
        if message["role"] == "assistant":
            prompt = _hf_ids(hf, conversation[:k], generation_prompt=True)
            after = _hf_ids(hf, conversation[:k + 1])
            assert full[:len(prompt)] == prompt and full[:len(after)] == after
            expected[len(prompt):len(after)] = [1] * (len(after) - len(prompt))
            assert template.prompt_ids(tokenizer, conversation[:k]) == prompt
    assert mask == expected


@settings(max_examples=100, deadline=None)
@given(conversation=conversations(), max_len=st.integers(1, 400))
def test_truncation_keeps_a_prefix_and_counts_what_it_cut(conversation, max_len):
    full_ids, full_mask = encode([conversation], BUILTIN["plain"], get_tokenizer("bytes"))[0]
    kept, counts = truncate([(full_ids, full_mask)], max_len)
    assert counts["truncated"] == int(len(full_ids) > max_len)
    if kept:
        ids, mask = kept[0]
        assert ids == full_ids[:max_len] and mask == full_mask[:len(ids)] and any(mask)
        assert counts["truncated_trained_tokens"] == sum(full_mask) - sum(mask) and counts["dropped"] == 0
    else:  # the prompt alone fills max_len
        assert not any(full_mask[:max_len]) and counts["dropped"] == 1


def test_a_template_too_long_for_the_context_is_refused(tmp_path):
    _, conv = read_conversations(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi", "completion": "yo"}]))
    markers = len(b"<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n") + 1  # + end-of-text
    with pytest.raises(UserError, match=f"template 'chatml' takes {markers} tokens for its markers and end-of-text "
                                        "alone, which leaves no room for a prompt and a reply in --max-seq-len 40"):
        build(conv, BUILTIN["chatml"], get_tokenizer("bytes"), 40, 0.0)
    build(conv, BUILTIN["chatml"], get_tokenizer("bytes"), markers + 4, 0.0)  # "hi" + "yo" fit
    with pytest.raises(UserError, match="every training example's prompt fills --max-seq-len 50"):
        build([[{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y"}]], BUILTIN["plain"],
              get_tokenizer("bytes"), 50, 0.0)


def test_template_files_are_checked(tmp_path):
    good = {"system": "S: {content}\n", "user": "Q: {content}\n", "assistant": "A:\n", "end": "\n[end]\n"}
    (tmp_path / "t.json").write_text(json.dumps(good))
    template = load_template(str(tmp_path / "t.json"))
    assert template.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]) == \
        "Q: x\nA:\ny\n[end]\n"
    for bad, fragment in (({**good, "end": "  "}, "'end' (the end marker after every reply) needs visible text"),
                          ({**good, "user": "Q:"}, "'user' must contain {content} once"),
                          ({"user": "{content}"}, "missing system, assistant, end")):
        (tmp_path / "b.json").write_text(json.dumps(bad))
        with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            load_template(str(tmp_path / "b.json"))
    with pytest.raises(UserError, match="not a built-in template \\(plain, chatml, alpaca\\)"):
        load_template("zephyr")


def test_the_validation_split_is_whole_records_and_ignores_the_seed():
    train, val = split_indices(79, 0.05)
    assert len(val) == 4 and sorted(train + val) == list(range(79)) and not set(train) & set(val)
    assert split_indices(79, 0.05) == (train, val)
    assert split_indices(5, 0.01)[1] and split_indices(1, 0.5) == ([0], [])


# ---- training rows --------------------------------------------------------------------------------

@st.composite
def example_sets(draw):
    n = draw(st.integers(1, 30))
    pairs = []
    for i in range(n):
        length = draw(st.integers(2, 17))
        mask = [0] + draw(st.lists(st.integers(0, 1), min_size=length - 1, max_size=length - 1))
        pairs.append(([(i * 7 + j) % 250 for j in range(length)], mask))
    return pairs


def _scored(x, y) -> list[list[int]]:
    return [[int(t) for t in row if t != IGNORE_INDEX] for row in y]


@settings(max_examples=80, deadline=None)
@given(pairs=example_sets(), packing=st.booleans(), seed=st.integers(0, 5), world=st.sampled_from([1, 2]))
def test_rows_hold_every_example_once_an_epoch_with_only_trained_targets(pairs, packing, seed, world):
    seq_len = 16
    examples = Examples.from_lists(pairs, 257)
    try:
        stream = SFTTrainStream(examples, seq_len, 2, seed, packing, pad_id=256)
    except UserError as e:
        assert "fewer than one global batch of 2" in str(e) and (packing or len(pairs) < 2)
        return
    n = stream.samples_per_epoch
    x, y = stream.rows.batch(range(n))
    assert x.shape == y.shape == (n, seq_len)
    # Each example's trained tokens appear, in order, as the scored targets of exactly one row.
    expected = sorted(tuple(t for t, m in zip(ids, mask) if m) for ids, mask in pairs)
    got = []
    for r, row in enumerate(stream.rows.rows):
        per_example = [tuple(t for t, m in zip(*pairs[i]) if m) for i in row]
        assert _scored(x[r:r + 1], y[r:r + 1])[0] == [t for e in per_example for t in e]
        assert sum(len(pairs[i][0]) for i in row) <= seq_len + 1
        assert torch_row_inputs_start_with(x[r], pairs[row[0]][0])
        got += per_example
    assert sorted(got) == expected
    # The global batch is one function of the cursor: ranks' slices concatenate to it; its target count is exact.
    for cursor in (0, 2, n, 3 * n + 1):
        whole = stream.local_batch(cursor, 0, 1)
        parts = [stream.local_batch(cursor, r, world) for r in range(world)]
        assert all((np.concatenate([p[k].numpy() for p in parts]) == whole[k].numpy()).all() for k in (0, 1))
        assert stream.scored_targets(cursor) == int((whole[1] != IGNORE_INDEX).sum())
    again = SFTTrainStream(examples, seq_len, 2, seed, packing, pad_id=256)
    assert (again.local_batch(5, 0, 1)[1] == stream.local_batch(5, 0, 1)[1]).all()


def torch_row_inputs_start_with(row, ids) -> bool:
    return [int(t) for t in row[:len(ids)]] == list(ids[:len(row)])


def test_packing_fills_rows_and_padding_uses_one_row_per_example():
    pairs = [([1, 2, 3, 4, 5], [0, 0, 1, 1, 1])] * 6
    examples = Examples.from_lists(pairs, 257)
    packed = SFTTrainStream(examples, 15, 1, 0, True, 256)
    padded = SFTTrainStream(examples, 15, 1, 0, False, 256)
    assert (len(packed.rows), len(padded.rows)) == (2, 6)  # 16 tokens a row: three 5-token examples each
    x, y = padded.rows.batch([0])
    assert x[0].tolist() == [1, 2, 3, 4, 5] + [256] * 10
    assert y[0].tolist() == [IGNORE_INDEX, 3, 4, 5] + [IGNORE_INDEX] * 11
    val = SFTValStream(examples, 15, 4, True, 256)
    with pytest.raises(UserError, match="less than one validation batch of 4"):
        val.count(1)


# ---- generation stops at the end marker -------------------------------------------------------------

class Scripted(torch.nn.Module):
    """A stand-in model whose greedy continuation of any prompt is `script` (byte ids), one token per forward."""

    def __init__(self, script: bytes, prompt_len: int):
        super().__init__()
        self.script, self.prompt_len = list(script), prompt_len
        self.config = types.SimpleNamespace(block_size=4096)
        self.wte = torch.nn.Embedding(1, 1)
        self.forwards = 0

    def forward(self, idx, kv_cache=None):
        self.forwards += 1
        logits = torch.zeros(1, idx.shape[1], 257)
        logits[0, -1, self.script[idx.shape[1] - self.prompt_len]] = 1.0
        return logits


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_a_chat_reply_ends_at_the_end_marker_and_never_shows_it(name):
    from trainer.eval.generate import sample

    template, tokenizer = BUILTIN[name], get_tokenizer("bytes")
    prompt = template.prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])
    model = Scripted(f"Hello <there>.{template.end}more text".encode(), len(prompt))
    shown = []
    reply = sample(model, tokenizer, "", 200, temperature=0, use_cache=False, prompt_ids=prompt, stop=template.stop,
                   on_text=shown.append)
    assert reply == "".join(shown) == "Hello <there>."
    assert model.forwards == len(f"Hello <there>.{template.end.rstrip()}")  # stopped as the marker completed
