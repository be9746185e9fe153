"""Load a model for inference from whatever a user points at, with the tokenizer it was trained with.

`load_model(path)` accepts, in this order:
  run directory        RUN/ with checkpoints/: its `latest` complete checkpoint
  checkpoint           RUN/checkpoints/step_NNNNNNN (a DeepSpeed dir), or a tag inside a run:
                       RUN/step_NNNNNNN or RUN/NNN (a step number)
  consolidated dir     model.safetensors + config.json (our ModelConfig), as written by models.save
                       and tools/zero_to_fp32.py, plus tokenizer_spec.txt (see write_tokenizer_spec)
  HF model dir         config.json with a `model_type` (GPT2LMHeadModel / LlamaForCausalLM / Qwen3ForCausalLM)
  hub name             e.g. `gpt2`, `openai-community/gpt2-medium` (needs the hub or its local cache)
DeepSpeed checkpoints are consolidated in memory from the ZeRO files (trainer.checkpoint), so no
manual zero_to_fp32 step is needed; the ModelConfig and tokenizer spec travel in the client_state, and
so does a fine-tuned model's chat template (beside exported files: sft_template.json).
`describe_model(path)` reads the ModelConfig and tokenizer of any of these without loading weights.
"""
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional

import torch

import models
from trainer.errors import UserError, describe

TOKENIZER_SPEC_FILE = "tokenizer_spec.txt"
# Hub names whose tokenizer is OpenAI's GPT-2 BPE: use our offline tiktoken encoder for them.
OPENAI_GPT2 = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2", "distilbert/distilgpt2"} | {
    f"openai-community/{n}" for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}


# ---- the tokenizer spec beside model files ------------------------------------------------------

def write_tokenizer_spec(directory, spec: str) -> None:
    """Record which tokenizer a model directory uses, so every later command needs only the path.

    `gpt2` and `bytes` are stored as they are. For `hf:PATH` / `sp:PATH` the tokenizer file is copied
    into the directory (tokenizer.json / tokenizer.model) and the spec is stored relative to it, so
    the directory can be moved or shared.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if spec.startswith(("hf:", "sp:")):
        source = Path(spec[3:]).expanduser()
        if spec.startswith("hf:") and source.is_dir():
            source = source / "tokenizer.json"
        local = "tokenizer.json" if spec.startswith("hf:") else "tokenizer.model"
        if source.is_file():
            target = directory / local
            if not target.exists():
                shutil.copyfile(source, target)
            spec = f"{spec[:3]}./{local}"
    (directory / TOKENIZER_SPEC_FILE).write_text(spec + "\n")


def read_tokenizer_spec(directory) -> Optional[str]:
    """The spec write_tokenizer_spec recorded (relative paths made absolute), or None."""
    file = Path(directory) / TOKENIZER_SPEC_FILE
    if not file.is_file():
        return None
    spec = file.read_text().strip()
    if spec.startswith(("hf:./", "sp:./")):
        spec = f"{spec[:3]}{(Path(directory) / spec[5:]).resolve()}"
    return spec or None


def _gpt2_merges(path: Path) -> bool:
    from trainer.data.tokenizer import GPT2_VOCAB_BPE_SHA256

    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == GPT2_VOCAB_BPE_SHA256


def guess_tokenizer_spec(directory) -> Optional[str]:
    """Tokenizer of a model directory: our recorded spec, else OpenAI's GPT-2 BPE, tokenizer.json, tokenizer.model."""
    directory = Path(directory)
    spec = read_tokenizer_spec(directory)
    if spec:
        return spec
    if _gpt2_merges(directory / "merges.txt"):
        return "gpt2"
    if (directory / "tokenizer.json").is_file():
        return f"hf:{(directory / 'tokenizer.json').resolve()}"
    if (directory / "tokenizer.model").is_file():
        return f"sp:{(directory / 'tokenizer.model').resolve()}"
    return None


# ---- resolution ---------------------------------------------------------------------------------

def _is_run_dir(path: Path) -> bool:
    return (path / "checkpoints").is_dir()


def _checkpoint_of_run(run: Path) -> Path:
    from trainer import checkpoint

    return checkpoint.resolve_checkpoint(run)  # the one rule: newest complete and sound checkpoint


def _tag_in_run(path: Path) -> Optional[Path]:
    """RUN/step_0000100 or RUN/100 -> RUN/checkpoints/step_0000100, when RUN is a run directory."""
    from trainer import checkpoint

    if not _is_run_dir(path.parent):
        return None
    name = checkpoint.tag_for(int(path.name)) if path.name.isdigit() else path.name
    ckpt = checkpoint.checkpoints_dir(path.parent) / name
    return ckpt if ckpt.is_dir() else None


def training_data_of(path) -> Optional[str]:
    """The dataset a run trained on (`data` in its config.yaml) for a run directory or a checkpoint inside
    one (RUN, RUN/step_N, RUN/checkpoints/step_N); None for anything else."""
    import yaml

    p = Path(str(path)).expanduser()
    for run in (p, p.parent, p.parent.parent):
        config = run / "config.yaml"
        if _is_run_dir(run) and config.is_file():
            try:
                data = (yaml.safe_load(config.read_text()) or {}).get("data")
            except (yaml.YAMLError, AttributeError):
                return None
            return str(data) if data else None
    return None


def resolve(path) -> tuple[str, Path]:
    """(kind, location): kind is run-checkpoint | checkpoint | consolidated | hf | hub."""
    from trainer import checkpoint

    p = Path(str(path)).expanduser()
    if p.is_dir():
        if _is_run_dir(p):
            return "run-checkpoint", _checkpoint_of_run(p)
        if checkpoint.model_states_file(p) is not None:
            return "checkpoint", p
        config = p / "config.json"
        if config.is_file():
            try:
                fields = json.loads(config.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{config} is not valid JSON ({e.msg})")
            if "model_type" in fields:
                return "hf", p
            if (p / "model.safetensors").is_file():
                return "consolidated", p
        raise UserError(f"--model-path {p}: not a run directory, DeepSpeed checkpoint, model directory "
                        "(model.safetensors + config.json) or Hugging Face model directory")
    tagged = _tag_in_run(p)
    if tagged is not None:
        return "checkpoint", tagged
    if p.exists():
        raise UserError(f"--model-path {p} is a file; pass the directory that holds it")
    looks_like_hub = (str(path) and not str(path).startswith((".", "/", "~")) and str(path).count("/") <= 1
                      and (p.parent == Path(".") or not p.parent.exists()))  # runs/typo is a local path
    if not looks_like_hub:
        raise UserError(f"--model-path {path}: no such directory")
    return "hub", Path(str(path))


def load_model(path, device="cpu", dtype=torch.float32, tokenizer: Optional[str] = None):
    """(GPT in eval mode on `device` in `dtype`, tokenizer spec or None, info dict) for any --model-path.

    `tokenizer` overrides the recorded / guessed spec. info holds kind, path (the resolved location),
    and for checkpoints step and client_state.
    """
    from trainer import checkpoint

    kind, where = resolve(path)
    info = {"kind": kind, "path": str(where), "template": None}
    if kind in ("run-checkpoint", "checkpoint"):
        _require_complete(where)
        state, client = checkpoint.consolidated_state_dict(where)
        with torch.device("meta"):
            model = models.GPT(_checkpoint_config(client, where))
        models.io.load_state(model, state)
        spec = client.get("tokenizer")
        info.update(step=client.get("step"), template=client.get("template"),
                    client_state={k: v for k, v in client.items()
                                  if k in ("step", "tokens", "tokenizer", "model_config")})
    elif kind == "consolidated":
        try:
            model = models.load(where)
        except (ValueError, TypeError) as e:
            raise UserError(f"cannot load model directory {where}: {e}")
        spec = guess_tokenizer_spec(where)
        info["template"] = _template_beside(where)
    else:
        name = str(where) if kind == "hf" else str(path)
        model = _load_hf(name, local=kind == "hf")
        spec = _hf_tokenizer_spec(name, local=kind == "hf")
        info["template"] = _template_beside(where) if kind == "hf" else None
    model = model.to(device=device, dtype=dtype).eval()
    model.refresh_buffers()  # RoPE tables stay fp32 on the new device
    return model, tokenizer or spec, info


def describe_model(path) -> tuple["models.ModelConfig", Optional[str], dict]:
    """(ModelConfig, tokenizer spec or None, info) of any --model-path, without loading its weights: what
    `finetune` sizes its run by before load_weights_into copies the weights in."""
    from trainer import checkpoint

    kind, where = resolve(path)
    info = {"kind": kind, "path": str(where)}
    if kind in ("run-checkpoint", "checkpoint"):
        _require_complete(where)
        client = checkpoint.client_state(where)
        return _checkpoint_config(client, where), client.get("tokenizer"), info
    if kind == "consolidated":
        try:
            config = models.io.read_config(where)
        except (ValueError, TypeError) as e:
            raise UserError(f"cannot read the model config in {where}: {e}")
        return config, guess_tokenizer_spec(where), info
    name = str(where) if kind == "hf" else str(path)
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UserError(_hf_load_error(name, kind == "hf", e))
    try:
        config = models.hf.config_from_hf(hf_config, padded_vocab_size=models.padded_vocab_size(hf_config.vocab_size))
    except ValueError as e:
        raise UserError(f"{name}: {e}")
    return config, _hf_tokenizer_spec(name, local=kind == "hf"), info


def _require_complete(ckpt: Path) -> None:
    from trainer import checkpoint

    if not checkpoint.is_complete(ckpt):
        raise UserError(f"checkpoint {ckpt} is incomplete (no {checkpoint.MARKER} marker: its save was "
                        "interrupted); pick an earlier checkpoint or the run directory")


def _checkpoint_config(client: dict, ckpt: Path) -> "models.ModelConfig":
    if "model_config" not in client:
        raise UserError(f"checkpoint {ckpt} has no model_config in its client_state; it was not written by "
                        "trainer.train.loop, so its architecture is unknown")
    return models.ModelConfig.from_dict(client["model_config"])


def _template_beside(directory) -> Optional[dict]:
    """The chat template a fine-tuned model's export carries (trainer/sft/template.py), or None."""
    from trainer.sft.template import read_template

    template = read_template(directory)
    return template.to_dict() if template else None


def _hf_load_error(name: str, local: bool, error: Exception) -> str:
    where = "directory" if local else "hub name"
    hint = "" if local else " (no network? download it once with network access, or pass a local directory)"
    return f"cannot load Hugging Face model {where} '{name}': {describe(error, line=0)}{hint}"


def _load_hf(name: str, local: bool):
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise UserError(f"loading Hugging Face models needs transformers ({e})")
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(_hf_load_error(name, local, e))
    try:  # padded as pretrain pads: the same matmul shapes, so the same numbers as the run it was exported from
        return models.hf.from_hf(hf_model, padded_vocab_size=models.padded_vocab_size(hf_model.config.vocab_size))
    except ValueError as e:
        raise UserError(f"{name}: {e}")


def _hf_tokenizer_spec(name: str, local: bool) -> Optional[str]:
    if local:
        return guess_tokenizer_spec(name)
    if name in OPENAI_GPT2:
        return "gpt2"
    return _hub_tokenizer_spec(name)


def _hub_tokenizer_spec(name: str) -> Optional[str]:
    """tokenizer.json of a hub model, from the local HF cache (from_pretrained just populated it)."""
    try:
        from transformers.utils import cached_file

        file = cached_file(name, "tokenizer.json", _raise_exceptions_for_missing_entries=False)
    except Exception:  # no tokenizer.json on the hub: the caller reports a missing tokenizer
        return None
    return f"hf:{file}" if file else None


def require_tokenizer(spec: Optional[str], path):
    """The Tokenizer for a loaded model, or a clear error saying how to name one."""
    from trainer.data.tokenizer import SPEC_HELP, get_tokenizer

    if not spec:
        raise UserError(f"no tokenizer is recorded for --model-path {path}; pass --tokenizer ({SPEC_HELP})")
    return get_tokenizer(spec)


# ---- pretrain --init-from -----------------------------------------------------------------------

def load_weights_into(model: torch.nn.Module, path) -> dict:
    """Copy the weights at `path` (any form load_model accepts) into an existing GPT of the same architecture.

    Only the padded vocabulary rows may differ (pretrain pads to a multiple of 64; HF models do not):
    the real rows are copied, pad rows are zeroed.
    """
    from trainer.checkpoint import architecture_differences

    source, _, info = load_model(path)
    mine = model.config
    # Vocabulary padding may differ (pretrain pads to a multiple of 64, HF models do not): real rows are copied.
    diff = architecture_differences(dataclasses.asdict(source.config), dataclasses.asdict(mine),
                                    tolerate=("padded_vocab_size",))
    if diff:
        named = "; ".join(f"{k} {theirs!r} vs {mine!r}" for k, theirs, mine in diff)
        raise UserError(f"--init-from {path}: its architecture differs from this run's model ({named}); "
                        "pick the matching --model preset or --set overrides")
    state = source.state_dict()
    target = model.state_dict()
    with torch.no_grad():
        for key, value in target.items():
            src = state[key]
            if src.shape != value.shape:  # vocabulary padding only (checked above)
                value.zero_()
                value[:mine.vocab_size].copy_(src[:mine.vocab_size])
            else:
                value.copy_(src)
    return info
