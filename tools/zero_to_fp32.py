"""A ZeRO checkpoint -> one consolidated fp32 model directory, or a Hugging Face model directory.

    python tools/zero_to_fp32.py runs/demo out/demo                  # newest complete checkpoint of a run
    python tools/zero_to_fp32.py runs/demo out/demo --tag 100        # or step_0000100
    python tools/zero_to_fp32.py runs/demo/checkpoints/step_0000100 out/demo-hf --hf

The fp32 master weights are gathered by trainer.checkpoint's consolidation (DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint` in lazy mode: one tensor materialised at a time), loaded strictly
into a model rebuilt from the ModelConfig stored in the checkpoint (so a tied lm_head comes back
tied, DeepSpeed issues #1896 / #3824), and written as `model.safetensors` + `config.json`. With
`--hf` the directory is what `transformers.AutoModelForCausalLM.from_pretrained` loads
(GPT2LMHeadModel for GPT-2, LlamaForCausalLM for GPT-2.5, Qwen3ForCausalLM with QK-norm), and the export
is checked by reloading it with transformers and comparing logits with ours on a sample. A fine-tuned
model's chat template goes with it: as `chat_template` in tokenizer_config.json (so
`pipeline("text-generation")` takes chat messages) and as sft_template.json (read by `generate --chat`).
"""
import json
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import click
import torch

import models
from trainer import checkpoint
from trainer.options import trust_option
from trainer.errors import UserError
from trainer.sft.template import Template, write_template

LOGITS_ATOL = 1e-4  # fp32 both sides; differences are summation order only (measured ~1e-6 on tiny)


def build_model(state: dict, client: dict, ckpt: Path) -> "models.GPT":
    if "model_config" not in client:
        raise UserError(f"{ckpt} carries no model_config in its client_state: it was not written by this trainer")
    config = models.ModelConfig.from_dict(client["model_config"])
    with torch.device("meta"):
        model = models.GPT(config)
    try:
        models.io.load_state(model, dict(state))  # strict: every key of our model, nothing else
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"the weights in {ckpt} do not fit the model config stored with them: {e}")
    head, emb = state.get("lm_head.weight"), state.get("transformer.wte.weight")
    if config.tie_embeddings and head is not None and emb is not None and not torch.equal(head, emb):
        raise UserError(f"{ckpt}: lm_head.weight differs from the embedding it is tied to; the checkpoint is damaged")
    return model.eval()


def export(path, out_dir, tag: Optional[str] = None, hf: bool = False, log=print) -> dict:
    """Consolidate a checkpoint into `out_dir`.

    Args:
        path: a run directory (its newest complete, sound checkpoint), a checkpoints/ dir or a checkpoint dir.
        out_dir: where model.safetensors + config.json (or, with `hf`, a transformers model dir) and the
            tokenizer files go.
        tag: a checkpoint of the run by name (step_0000100) or step number (100).
        hf: write a Hugging Face model directory and check its logits against ours.
        log: where progress lines go.

    Returns:
        {checkpoint, out, step, hf, params, tokenizer, tokenizer_files, ...}.
    """
    ckpt = checkpoint.resolve_checkpoint(path, tag)
    marker = checkpoint.check_shards(ckpt)
    log(f"consolidating {ckpt}" + (f" (ZeRO-{marker['zero_stage']} on {marker['world_size']} ranks)" if marker else ""))
    state, client = checkpoint.consolidated_state_dict(ckpt)
    model = build_model(state, client, ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_spec = client.get("tokenizer")
    result = {"checkpoint": str(ckpt), "out": str(out), "step": client.get("step"), "hf": hf,
              "params": model.num_params(), "tokenizer": tokenizer_spec, "tokenizer_files": False}
    eot_id = _eot_id(tokenizer_spec, log)
    if hf:
        result.update(_export_hf(model, out, eot_id, log))
    else:
        models.save(model, out)
    template = Template.from_dict(client["template"]) if client.get("template") else None
    if template is not None:
        write_template(out, template)
        result["chat_template"] = template.name
    if tokenizer_spec:
        result["tokenizer_files"] = _write_tokenizer(tokenizer_spec, out, model.config.block_size, log,
                                                     template.jinja() if template else None)
    log(f"wrote {out} ({'Hugging Face ' + result.get('hf_class', '') if hf else 'model.safetensors + config.json'}"
        f", {result['params']:,} parameters, step {result['step']})")
    return result


def _eot_id(spec: Optional[str], log) -> Optional[int]:
    """The end-of-text id of the run's tokenizer (the export's bos and eos), None when it cannot be built."""
    from trainer.data.tokenizer import get_tokenizer

    if not spec:
        return None
    try:
        return get_tokenizer(spec).eot_id
    except Exception as e:  # e.g. an hf:/sp: file moved since training: export the weights all the same
        log(f"note: tokenizer {spec} cannot be loaded ({type(e).__name__}: {e}); bos/eos set to the last id")
        return None


def _export_hf(model, out: Path, eot_id: Optional[int], log) -> dict:
    from transformers import AutoModelForCausalLM

    try:
        hf_model = models.hf.to_hf(model, eot_id)
    except ValueError as e:
        raise UserError(str(e))
    hf_model.save_pretrained(str(out), safe_serialization=True)
    # Check the files on disk, as a user will load them, against our model on a fixed sample.
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    config = model.config
    idx = torch.randint(0, config.vocab_size, (2, min(config.block_size, 32)),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx).float()
        theirs = reloaded(idx).logits.float()
    diff = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else float("inf")
    log(f"logits check against transformers {type(reloaded).__name__}: max abs diff {diff:.3g} "
        f"(tolerance {LOGITS_ATOL:g})")
    if not diff <= LOGITS_ATOL:
        raise UserError(f"the exported {type(reloaded).__name__} in {out} does not reproduce this model: logits differ "
                        f"by up to {diff:.3g} (> {LOGITS_ATOL:g}); do not use this export")
    return {"hf_class": type(reloaded).__name__, "logits_max_abs_diff": diff}


def _write_tokenizer(spec: str, out: Path, block_size: int, log, chat_template: Optional[str] = None) -> bool:
    """Tokenizer files HF loads (encoding as ours, model_max_length = the block size, the chat template), and
    the spec our own commands read."""
    from trainer.data.tokenizer import get_tokenizer
    from trainer.eval.modelio import write_tokenizer_spec

    write_tokenizer_spec(out, spec)
    try:
        written = bool(get_tokenizer(spec).save_hf(out, model_max_length=block_size, chat_template=chat_template))
    except Exception as e:  # a missing tokenizer file should not undo a finished export
        log(f"note: tokenizer {spec} not written ({type(e).__name__}: {e})")
        return False
    if not written:
        log(f"note: tokenizer {spec} has no Hugging Face form; its spec is in {out}/tokenizer_spec.txt")
    return written


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--tag", help="Checkpoint in the run: step_0000100 or 100. [default: the newest complete one]")
@click.option("--hf", is_flag=True, help="Write a Hugging Face model dir (AutoModelForCausalLM) and check its logits.")
@click.option("--json", "json_output", is_flag=True, help="Print the result as one JSON line.")
@trust_option
def main(path, out_dir, tag, hf, json_output):
    """Consolidate the ZeRO checkpoint at PATH (run dir or checkpoint dir) into OUT_DIR."""
    result = export(path, out_dir, tag=tag, hf=hf, log=lambda m: click.echo(m, err=json_output))
    if json_output:
        click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
