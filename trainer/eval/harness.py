"""`eval-harness`: standard benchmarks (HellaSwag, LAMBADA, ARC, PIQA, WikiText, ...) through
lm-evaluation-harness, with our model in process (trainer/eval/harness_lm.py), on any --model-path.

This is how GPT-2 reproductions compare with OpenAI's weights and with each other (litgpt, gpt-neox
and Megatron-DeepSpeed all run lm-evaluation-harness). lm-eval is an optional extra
(`pip install -e ".[eval]"`) imported only here, so the rest of the CLI runs without it. Task data
comes from the Hugging Face hub (or its local cache); `--include-path DIR` adds task YAMLs of your
own, e.g. over local jsonl files. Prints lm-eval's results table, and with --json one JSON object
as the last line. Data-parallel under the deepspeed launcher or torchrun with the numbers of one
process (see harness_lm.py).
"""
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

from trainer import dist
from trainer.config import HarnessConfig
from trainer.errors import UserError, describe

INSTALL_HINT = 'pip install -e ".[eval]" (or pip install "lm-eval[hf]>=0.4.13,<0.5")'


def require_lm_eval():
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401
    except ImportError as e:
        raise UserError(f"eval-harness needs lm-evaluation-harness, which is not installed ({e}); {INSTALL_HINT}")
    return lm_eval


def tasks_and_manager(tasks: str, include_path: Optional[str]):
    """(task names, lm-eval TaskManager that knows them all): lm-eval's own tasks and groups plus --include-path's.
    When --include-path holds every task asked for, lm-eval's ~15k built-in ones are not indexed (seconds)."""
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if not names:
        raise UserError("--tasks is empty; name one or more, e.g. --tasks hellaswag,lambada_openai")
    if include_path:
        if not Path(include_path).is_dir():
            raise UserError(f"--include-path {include_path}: no such directory (it holds task YAML files)")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return names, local
    manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; `lm_eval ls tasks` lists lm-eval's tasks, and "
                        "--include-path DIR adds your own task YAMLs")
    return names, manager


def check_task_data(names: list[str], task_manager) -> None:
    """Build the tasks (lm-eval downloads their data from the Hugging Face hub, or reads its cache);
    no network and no cache is one clear line, not a traceback."""
    try:
        task_manager.load(names)
    except (ConnectionError, FileNotFoundError) as e:  # datasets' DatasetNotFoundError is a FileNotFoundError
        raise UserError(f"cannot load the data of {', '.join(names)} ({describe(e, line=0)}); lm-eval fetches task "
                        "data from the Hugging Face hub: run once with network access (it is cached then), or pass "
                        "--include-path DIR with task YAMLs over local files")


def run(cfg: HarnessConfig, json_output: bool = False) -> dict:
    """`eval-harness`: lm-evaluation-harness tasks on the model at cfg.model_path, data-parallel under a
    launcher; prints lm-eval's table (and one JSON line with `json_output`). Returns the results dict."""
    lm_eval = require_lm_eval()
    from lm_eval.utils import make_table

    from trainer.eval import modelio
    from trainer.eval.device import resolve_dtype, setup_device
    from trainer.eval.harness_lm import HarnessLM

    if cfg.batch_size < 1:
        raise UserError(f"--batch-size {cfg.batch_size} must be at least 1")
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"--limit {cfg.limit} must be at least 1 (examples per task)")
    if not dist.is_main():  # every rank runs lm-eval's bookkeeping; one of them says so
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    names, task_manager = tasks_and_manager(cfg.tasks, cfg.include_path)
    check_task_data(names, task_manager)  # before the model: a missing download fails in seconds
    device = setup_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, spec, info = modelio.load_model(cfg.model_path, device=device, dtype=dtype, tokenizer=cfg.tokenizer)
    tokenizer = modelio.require_tokenizer(spec, cfg.model_path)
    lm = HarnessLM(model, tokenizer, device, batch_size=cfg.batch_size, max_gen_toks=cfg.max_gen_toks,
                   seed=cfg.seed, progress=cfg.progress)
    started = time.time()
    # lm-eval aggregates only where LOCAL_RANK is 0 (its guess for tensor-parallel launchers); every one of our
    # ranks runs a whole single-process evaluation (harness_lm.py splits the model work), so each aggregates.
    local_rank = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                          task_manager=task_manager)
    finally:
        if local_rank is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = local_rank
    summary = {"results": results["results"], "groups": results.get("groups", {}), "n-shot": results.get("n-shot"),
               "n-samples": results.get("n-samples"), "versions": results.get("versions"), "tasks": names,
               "model": info["path"], "tokenizer": tokenizer.spec, "limit": cfg.limit, "batch_size": cfg.batch_size,
               "dtype": str(dtype).replace("torch.", ""), "world_size": dist.world_size(),
               "seconds": round(time.time() - started, 3)}
    summary = json.loads(json.dumps(summary, default=_plain))
    if dist.is_main():
        print(f"eval-harness: {info['path']} ({tokenizer.spec}, {summary['dtype']}, {dist.world_size()} rank(s))",
              flush=True)
        print(make_table(results), flush=True)
        if results.get("groups"):
            print(make_table(results, "groups"), flush=True)
        if json_output:
            print(json.dumps(summary), flush=True)
    return summary


def _plain(value):
    """JSON for numpy scalars and anything else lm-eval puts in its results."""
    return value.item() if hasattr(value, "item") else str(value)
