"""Instruction-tuning records in their common layouts -> one conversation (a list of messages) each.

A message is {"role": "system" | "user" | "assistant", "content": str}. Layouts (`--format`; `auto` lets
the first record's fields decide, and every later record must then have that layout's fields):

  alpaca             {"instruction", "input" (optional), "output"}: the user turn is the instruction, and
                     the input after a blank line when there is one; the assistant turn is the output
  chat               {"messages": [...]} or {"conversations": [...]}, each message {"role", "content"} or
                     ShareGPT's {"from", "value"}; roles user / human / prompter, assistant / gpt / bot /
                     model, system (OpenAssistant and ShareGPT data after flattening to one thread a record)
  prompt-completion  {"prompt", "completion"}: two strings (a user turn and its reply), or two message
                     lists (TRL's conversational form)

Every assistant message is a response the model learns. A record without the fields of its layout, with
a message of unknown role or non-text content, or with an empty response is an error naming the record
(file and line). Messages after the last assistant message have no response to learn and are left out.
"""
from trainer.errors import UserError

FORMATS = ("alpaca", "chat", "prompt-completion")
REQUIRED = {"alpaca": ("instruction", "output"), "chat": ("messages",), "prompt-completion": ("prompt", "completion")}
ROLES = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant", "system": "system"}


def detect_format(record: dict, where: str) -> str:
    """The layout a record's fields say, or an error listing what each layout needs."""
    if "messages" in record or "conversations" in record:
        return "chat"
    for fmt in ("alpaca", "prompt-completion"):
        if all(k in record for k in REQUIRED[fmt]):
            return fmt
    raise UserError(f"{where}: cannot tell the layout of a record with fields {_fields(record)}; expected "
                    f"{_needs()} (or pass --format)")


def to_messages(record: dict, fmt: str, where: str) -> list[dict]:
    """The conversation of one record in layout `fmt` (validated; see the module docstring)."""
    if fmt == "chat":
        key = "messages" if "messages" in record else "conversations" if "conversations" in record else None
        if key is None:
            raise UserError(f"{where} has no 'messages' (a chat record needs a list of messages; has: "
                            f"{_fields(record)})")
        messages = _message_list(record[key], where, key)
    else:
        missing = [k for k in REQUIRED[fmt] if k not in record]
        if missing:
            raise UserError(f"{where} has no {', '.join(repr(k) for k in missing)} (an {fmt} record needs "
                            f"{', '.join(REQUIRED[fmt])}; has: {_fields(record)})")
        if fmt == "alpaca":
            messages = _alpaca(record, where)
        else:
            messages = _turn(record["prompt"], "user", where, "prompt") + \
                _turn(record["completion"], "assistant", where, "completion")
    return _through_last_response(messages, where)


def read_conversations(spec: str, fmt: str = "auto") -> tuple[str, list[list[dict]]]:
    """(the layout, every record's conversation) of a source spec (trainer.data.sources.iter_records)."""
    from trainer.data.sources import iter_records

    conversations = []
    for where, record in iter_records(spec):
        if fmt == "auto":
            fmt = detect_format(record, where)
        conversations.append(to_messages(record, fmt, where))
    if not conversations:
        raise UserError(f"--data {spec} holds no records")
    return fmt, conversations


def _alpaca(record: dict, where: str) -> list[dict]:
    instruction = _text(record["instruction"], where, "'instruction'")
    extra = record.get("input")
    extra = "" if extra is None else _text(extra, where, "'input'")
    prompt = f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction
    output = _text(record["output"], where, "'output'")
    if not output.strip():
        raise UserError(f"{where}: the response ('output') is empty; drop the record or give it a response")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _turn(value, role: str, where: str, field: str) -> list[dict]:
    """A prompt / completion field: a string (one message of `role`) or a list of messages."""
    if isinstance(value, list):
        return _message_list(value, where, field)
    return [{"role": role, "content": _text(value, where, f"'{field}'")}]


def _message_list(value, where: str, field: str) -> list[dict]:
    if not isinstance(value, list):
        raise UserError(f"{where}: '{field}' is a {type(value).__name__}, not a list of messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise UserError(f"{where}: message {i} of '{field}' is a {type(m).__name__}, not an object with role "
                            "and content")
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise UserError(f"{where}: message {i} of '{field}' has role {role!r}; known roles: {', '.join(ROLES)}")
        messages.append({"role": ROLES[role.lower()], "content": _text(content, where, f"message {i} of '{field}'")})
    return messages


def _through_last_response(messages: list[dict], where: str) -> list[dict]:
    """Messages up to the last assistant message; every assistant message must have text."""
    answered = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answered:
        raise UserError(f"{where} has no assistant message: nothing to learn")
    for i in answered:
        if not messages[i]["content"].strip():
            raise UserError(f"{where}: the response (assistant message {i}) is empty; drop the record or give "
                            "it a response")
    return messages[:answered[-1] + 1]


def _text(value, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: {what} is {'missing' if value is None else 'a ' + type(value).__name__}, "
                        "not text")
    return value


def _fields(record: dict) -> str:
    return ", ".join(map(str, record)) or "none"


def _needs() -> str:
    return "; ".join(f"{fmt}: {', '.join(fields)}" for fmt, fields in REQUIRED.items())
