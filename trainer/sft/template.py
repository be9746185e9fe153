"""Chat templates: how a conversation becomes text, which of it the model learns, where a reply ends.

A template is four plain-text parts; `{content}` stands for a message's text, trimmed of surrounding
whitespace (as Jinja's `trim` does, so the Hugging Face chat_template renders the same characters):

    part        what it is                                         `plain` (the default)
    system      a system message                                   "<|system|>\\n{content}\\n"
    user        a user message                                     "<|user|>\\n{content}\\n"
    assistant   the text before every reply: the generation prompt "<|assistant|>\\n"
    end         the text after every reply: the end marker         "\\n<|end|>\\n"

so one exchange reads

    <|user|>
    Explain the topic assert
    <|assistant|>
    Assert statements are a convenient way to insert debugging assertions ...
    <|end|>

Each reply and its end marker are trained (the model learns to answer and to stop); everything else is
context, masked out of the loss. A training example also ends with the tokenizer's end-of-text token,
trained: after the end marker the model emits end-of-text, the eos at which Hugging Face generation
stops. The markers are text, not special tokens, so every template works with GPT-2's vocabulary and
with byte-level models. Built in: `plain`, `chatml` (ChatML's <|im_start|> / <|im_end|> lines, as text)
and `alpaca` (Stanford Alpaca's ### Instruction / ### Response); `--template FILE.json` reads the four
parts from a file.

Tokenization: the context between two replies is encoded as one piece, each reply with its end marker as
another, and the ids are concatenated; generation encodes its prompt the same way, so the prompt a model
sees at inference is token for token the prefix it was trained on. Hugging Face encodes the rendered
text in one go. With byte-level BPE (GPT-2, `hf:` byte-level tokenizers) and bytes both give the same ids
when every piece boundary lies between a newline and a non-space character, which the GPT-2
pre-tokenizer never merges across: the built-in templates end their context parts and end markers with
one newline and contents are trimmed (tests/test_sft_data.py checks this against transformers).
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from trainer.errors import UserError

TEMPLATE_FILE = "sft_template.json"  # beside exported models: the template `generate --chat` applies
PARTS = ("system", "user", "assistant", "end")


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    user: str
    assistant: str
    end: str

    @property
    def stop(self) -> str:
        """The end marker as generation looks for it (without the whitespace around it)."""
        return self.end.strip()

    def pieces(self, messages: list[dict], generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """(text, trained) pieces of a conversation: context and replies alternate, adjacent context merged."""
        out: list[tuple[str, bool]] = []

        def add(text: str, trained: bool) -> None:
            if not text:
                return
            if out and out[-1][1] == trained:
                out[-1] = (out[-1][0] + text, trained)
            else:
                out.append((text, trained))

        for message in messages:
            content = message["content"].strip()
            if message["role"] == "assistant":
                add(self.assistant, False)
                add(content + self.end, True)
            else:
                add(getattr(self, message["role"]).replace("{content}", content), False)
        if generation_prompt:
            add(self.assistant, False)
        return out

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        """The conversation as text (what the Jinja chat_template renders)."""
        return "".join(text for text, _ in self.pieces(messages, generation_prompt))

    def prompt_ids(self, tokenizer, messages: list[dict]) -> list[int]:
        """Token ids of the prompt for the next reply, encoded piece by piece as in training."""
        return [i for text, _ in self.pieces(messages, generation_prompt=True) for i in tokenizer.encode(text)]

    def jinja(self) -> str:
        """The same template for `tokenizer.apply_chat_template` (Hugging Face's chat_template)."""
        def around(part: str, content: str) -> str:
            before, after = part.split("{content}") if "{content}" in part else (part, "")
            return "{{ " + json.dumps(before) + " + " + content + " + " + json.dumps(after) + " }}"

        text = "(message['content'] | trim)"
        return ("{%- for message in messages -%}"
                "{%- if message['role'] == 'system' -%}" + around(self.system, text) +
                "{%- elif message['role'] == 'user' -%}" + around(self.user, text) +
                "{%- elif message['role'] == 'assistant' -%}" + around(self.assistant + "{content}" + self.end, text) +
                "{%- else -%}{{ raise_exception('unknown role ' + message['role'] + "
                "': use system, user or assistant') }}"
                "{%- endif -%}{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{ " + json.dumps(self.assistant) + " }}{%- endif -%}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, name: Optional[str] = None, where: str = "template") -> "Template":
        if not isinstance(values, dict):
            raise UserError(f"{where} must be a JSON object with the parts {', '.join(PARTS)}")
        unknown = sorted(set(values) - set(PARTS) - {"name"})
        missing = [p for p in PARTS if p not in values]
        if unknown or missing:
            raise UserError(f"{where}: " + "; ".join(
                ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) +
                ([f"missing {', '.join(missing)}"] if missing else [])) + f" (a template has {', '.join(PARTS)})")
        for part in PARTS:
            if not isinstance(values[part], str):
                raise UserError(f"{where}: '{part}' must be text, got {type(values[part]).__name__}")
            wanted = 1 if part in ("system", "user") else 0
            if values[part].count("{content}") != wanted:
                raise UserError(f"{where}: '{part}' must contain {{content}} {'once' if wanted else 'nowhere'}")
        if not values["end"].strip():
            raise UserError(f"{where}: 'end' (the end marker after every reply) needs visible text, such as <|end|>")
        return cls(name=name or str(values.get("name") or where), **{p: values[p] for p in PARTS})


BUILTIN = {
    "plain": Template("plain", system="<|system|>\n{content}\n", user="<|user|>\n{content}\n",
                      assistant="<|assistant|>\n", end="\n<|end|>\n"),
    "chatml": Template("chatml", system="<|im_start|>system\n{content}<|im_end|>\n",
                       user="<|im_start|>user\n{content}<|im_end|>\n", assistant="<|im_start|>assistant\n",
                       end="<|im_end|>\n"),
    "alpaca": Template("alpaca", system="{content}\n\n", user="### Instruction:\n{content}\n\n",
                       assistant="### Response:\n", end="\n### End\n"),
}


def load_template(spec: str) -> Template:
    """A built-in template by name, or one from a JSON file with the four parts."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"--template {spec}: not a built-in template ({', '.join(BUILTIN)}) nor a JSON file")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--template {spec}: cannot read it as JSON ({e})")
    return Template.from_dict(values, name=str(path), where=f"template file {path}")


def write_template(directory, template: Template) -> None:
    """Record the template beside a model's files (`generate --chat` reads it from there)."""
    (Path(directory) / TEMPLATE_FILE).write_text(json.dumps(template.to_dict(), indent=2) + "\n")


def read_template(directory) -> Optional[Template]:
    """The template recorded beside a model's files, or None."""
    file = Path(directory) / TEMPLATE_FILE
    if not file.is_file():
        return None
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{file} is not a readable template ({e}); delete it or pass --template")
    return Template.from_dict(values, where=str(file))
