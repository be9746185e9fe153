"""The consolidation scripts in RUN/checkpoints/: ours in place of the copies DeepSpeed leaves there.

DeepSpeed copies its `zero_to_fp32.py` and `zero_to_torch.py` into every checkpoint root, and users
run them. On our models they fail with `--safe_serialization` ("Some tensors share memory": the
tied lm_head and embedding are one tensor, which safetensors refuses to save twice), and without it
they write a bare state dict with no config or tokenizer. After each save the trainer replaces
both files with a small script of the same name that takes DeepSpeed's arguments and runs
tools/zero_to_fp32.py, which keeps the tie, writes model.safetensors + config.json + the tokenizer,
and with `--hf` a Hugging Face model directory.
"""
import os
from pathlib import Path

from trainer.fileio import atomic_open

NAMES = ("zero_to_fp32.py", "zero_to_torch.py")
# The checkout (or site-packages) holding trainer/ and tools/, recorded in the script so it runs from anywhere.
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = '''#!/usr/bin/env python
"""Consolidate a checkpoint of this run (written by gpt-trainer in place of DeepSpeed's copy).

    python {name} CHECKPOINT_DIR OUTPUT_DIR [--tag TAG] [--hf]

Runs gpt-trainer's tools/zero_to_fp32.py: model.safetensors + config.json + tokenizer files, the tied
embedding kept tied (DeepSpeed's own script cannot save it with --safe_serialization); --hf writes a
directory transformers' AutoModelForCausalLM loads. CHECKPOINT_DIR is this directory (newest complete
checkpoint, or --tag step_NNNNNNN), a run directory or one checkpoint. DeepSpeed's other options are
accepted: --safe_serialization (always: safetensors), --max_shard_size (one file),
--exclude_frozen_parameters and --debug (nothing to do), --dtype float32 (the fp32 master weights).
"""
import argparse
import sys
from pathlib import Path

ROOT = {root!r}  # where gpt-trainer's trainer/ and tools/ were when this checkpoint was written


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir")
    parser.add_argument("output_dir")
    parser.add_argument("-t", "--tag", help="checkpoint in the directory, e.g. step_0000100 or 100")
    parser.add_argument("--hf", action="store_true", help="write a Hugging Face model directory")
    parser.add_argument("--dtype", default="float32", help="float32 only: the fp32 master weights")
    parser.add_argument("--safe_serialization", action="store_true", help="accepted; output is always safetensors")
    parser.add_argument("--max_shard_size", help="accepted; the model is written as one file")
    parser.add_argument("--exclude_frozen_parameters", action="store_true", help="accepted; none are frozen")
    parser.add_argument("-d", "--debug", action="store_true", help="accepted")
    args = parser.parse_args()
    if args.dtype not in ("float32", "fp32"):
        parser.error(f"--dtype {{args.dtype}}: this export writes the fp32 master weights; load them and cast "
                     "(e.g. AutoModelForCausalLM.from_pretrained(OUT, dtype=torch.bfloat16) after --hf)")
    if (Path(ROOT) / "tools" / "zero_to_fp32.py").is_file():
        sys.path.insert(0, ROOT)
    try:
        from tools.zero_to_fp32 import main as export
    except ImportError as e:
        sys.exit(f"Error: gpt-trainer's tools/zero_to_fp32.py is not importable ({{e}}; it was in {{ROOT}}). From "
                 "your gpt-trainer checkout run: python tools/zero_to_fp32.py "
                 f"{{args.checkpoint_dir}} {{args.output_dir}}")
    argv = [args.checkpoint_dir, args.output_dir] + (["--tag", args.tag] if args.tag else [])
    argv += ["--hf"] if args.hf else []
    export.main(argv, prog_name=Path(__file__).name)


if __name__ == "__main__":
    main()
'''


def write(checkpoints_root) -> bool:
    """Put our scripts in a run's checkpoints/ directory, over DeepSpeed's copies (each written atomically).

    Called after a checkpoint is complete; a failed write (disk full) leaves that checkpoint complete and
    returns False: the scripts are a convenience, tools/zero_to_fp32.py does the same from the checkout."""
    root = Path(checkpoints_root)
    try:
        for name in NAMES:
            target = root / name
            with atomic_open(target) as f:
                f.write(SCRIPT.format(name=name, root=str(ROOT)))
                os.fchmod(f.fileno(), 0o755)
    except OSError:
        return False
    return True
