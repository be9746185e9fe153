"""eval-harness: our model inside lm-evaluation-harness gives what `lm_eval --model hf` gives on its Hugging
Face export (every metric, every request's loglikelihood, every generated text), on every --model-path
kind, on 2 ranks as on 1, and bad input or a missing lm-eval is one clear line. Offline: local task YAMLs
over pydoc jsonl files (a multiple-choice task, a loglikelihood_rolling task, a generate_until task)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import launch_env, run_cli, single_process_env

from tools.pydoc_tasks import pydoc_texts, write_choice_task, write_generate_task, write_rolling_task
from trainer.cli import cli

REPO = Path(__file__).resolve().parent.parent
TASKS = ["pydoc_choice", "pydoc_rolling", "pydoc_generate"]


def subprocess_env() -> dict:
    return launch_env(HF_DATASETS_OFFLINE="1")


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """GPT-2 tiny on the pydoc bytes, 60 steps with ZeRO-2 fp32: a run dir, plus its consolidated and HF exports."""
    from tools.zero_to_fp32 import export

    root = tmp_path_factory.mktemp("harness")
    args = ["pretrain", "--model", "tiny", "--data", str(data), "--out", str(root / "run"), "--ds-config", "zero2_fp32",
            "--seq-len", "64", "--micro-batch", "8", "--global-batch", "8", "--max-steps", "60", "--lr", "3e-3",
            "--warmup-steps", "5", "--eval-every", "0", "--save-every", "60", "--no-tracking"]
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    export(root / "run", root / "consolidated", log=lambda m: None)
    export(root / "run", root / "hf", hf=True, log=lambda m: None)
    tasks = root / "tasks"
    write_choice_task(tasks, "pydoc_choice", 25)
    write_rolling_task(tasks, "pydoc_rolling", pydoc_texts(4, 1500))
    write_generate_task(tasks, "pydoc_generate", 5)  # odd: on 2 ranks one idles in lock-step
    return {"run": root / "run", "consolidated": root / "consolidated", "hf": root / "hf", "tasks": tasks}


def eval_harness(*args) -> dict:
    result = CliRunner().invoke(cli, ["eval-harness", *map(str, args), "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lm_eval_hf(run):
    """`lm_eval --model hf` on the export, with every request's response logged."""
    import lm_eval

    with single_process_env():
        return lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(run["hf"]), "dtype": "float32"},
                                       tasks=TASKS, task_manager=local_tasks(run), device="cpu", batch_size=4,
                                       log_samples=True)


def local_tasks(run):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(run["tasks"]), include_defaults=False)


def metrics(results: dict) -> dict:
    return {(task, key): value for task, values in results.items() for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def test_eval_harness_on_a_run_equals_lm_eval_hf_on_its_export(run, lm_eval_hf):
    ours = eval_harness("--model-path", run["run"], "--tasks", ",".join(TASKS), "--include-path", run["tasks"])
    theirs = metrics(lm_eval_hf["results"])
    assert set(metrics(ours["results"])) == set(theirs)
    for key, value in metrics(ours["results"]).items():
        assert value == pytest.approx(theirs[key], rel=1e-4), key
    assert ours["results"]["pydoc_choice"]["acc,none"] > 0.25  # trained: better than chance on 4 choices
    assert ours["world_size"] == 1 and ours["tokenizer"] == "bytes"


def test_every_request_matches_lm_eval_hf(run, lm_eval_hf):
    """Per request, in process: loglikelihoods and greedy flags of every choice, rolling loglikelihoods, and
    the generated texts (the trained byte model does produce text, and stops at the newline)."""
    import lm_eval

    from trainer.data.tokenizer import get_tokenizer
    from trainer.eval.harness_lm import HarnessLM
    from trainer.eval.modelio import load_model

    model, spec, _ = load_model(run["run"])
    with single_process_env():
        ours = lm_eval.simple_evaluate(model=HarnessLM(model, get_tokenizer(spec), "cpu", batch_size=5), tasks=TASKS,
                                       task_manager=local_tasks(run), log_samples=True)
    for task in TASKS:
        mine = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        theirs = sorted(lm_eval_hf["samples"][task], key=lambda s: s["doc_id"])
        assert len(mine) == len(theirs) > 0
        for a, b in zip(mine, theirs):
            assert a["arguments"] == b["arguments"]
            for (x,), (y,) in zip(a["resps"], b["resps"]):
                if task == "pydoc_generate":
                    assert x == y
                elif task == "pydoc_rolling":
                    assert x == pytest.approx(y, rel=1e-5)
                else:
                    assert x[0] == pytest.approx(y[0], rel=1e-5) and x[1] == y[1]
    generated = [s["resps"][0][0] for s in ours["samples"]["pydoc_generate"]]
    assert any(generated) and all("\n" not in g for g in generated)


def test_every_model_path_kind_gives_the_same_numbers(run):
    tasks = ["--tasks", "pydoc_choice,pydoc_rolling", "--include-path", run["tasks"], "--batch-size", "3"]
    step = next((run["run"] / "checkpoints").glob("step_*"))
    results = [eval_harness("--model-path", path, *tasks)["results"]
               for path in (run["run"], step, run["consolidated"], run["hf"])]
    for other in results[1:]:
        assert metrics(other).keys() == metrics(results[0]).keys()
        for key, value in metrics(other).items():
            assert value == pytest.approx(metrics(results[0])[key], rel=1e-9), key


@pytest.mark.slow
def test_two_ranks_give_the_numbers_of_one(run):
    args = ["eval-harness", "--model-path", str(run["run"]), "--tasks", ",".join(TASKS), "--include-path",
            str(run["tasks"]), "--batch-size", "7", "--no-progress", "--json"]  # 15 choice batches: one rank idles
    one, two = run_cli(args, env=subprocess_env()), run_cli(args, ranks=2, env=subprocess_env())
    r1 = json.loads(one.stdout.strip().splitlines()[-1])
    r2 = json.loads([line for line in two.stdout.splitlines() if line.startswith("{")][-1])
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    assert r2["results"] == r1["results"]  # exactly: same batches, same kernels, each request on one rank


def cli_error(args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    return result.output


def test_bad_input_is_one_clear_line(run, tmp_path):
    base = ["eval-harness", "--model-path", run["consolidated"]]
    assert "unknown task(s) no_such_task" in cli_error([*base, "--tasks", "no_such_task"])
    assert "--tasks is empty" in cli_error([*base, "--tasks", " , "])
    assert "no such directory" in cli_error([*base, "--tasks", "pydoc_choice", "--include-path", tmp_path / "nope"])
    assert "--batch-size 0 must be at least 1" in cli_error([*base, "--tasks", "x", "--batch-size", "0"])
    assert "no such directory" in cli_error(["eval-harness", "--model-path", tmp_path / "nope", "--tasks",
                                             "pydoc_choice", "--include-path", run["tasks"]])
    write_rolling_task(tmp_path, "moved_task", ["text"])
    (tmp_path / "moved_task.jsonl").unlink()  # its data is gone (offline, this is a hub download failing too)
    assert "cannot load the data of moved_task" in cli_error([*base, "--tasks", "moved_task", "--include-path",
                                                              tmp_path])


def test_without_lm_eval_the_command_says_how_to_install_it(run):
    """lm-eval is an optional extra: hidden from this process, `--help` still works and eval-harness says what
    to install."""
    hide = "import sys; sys.modules['lm_eval'] = None; from trainer.cli import cli; cli()"
    help_ = subprocess.run([sys.executable, "-c", hide, "--help"], cwd=REPO, env=subprocess_env(),
                           capture_output=True, text=True, timeout=300)
    assert help_.returncode == 0 and "eval-harness" in help_.stdout
    proc = subprocess.run([sys.executable, "-c", hide, "eval-harness", "--model-path", str(run["consolidated"]),
                           "--tasks", "hellaswag"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert 'needs lm-evaluation-harness' in proc.stderr and 'pip install -e ".[eval]"' in proc.stderr
