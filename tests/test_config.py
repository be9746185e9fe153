"""Run configs: YAML + flags precedence, recipes that load, and one-line errors for bad input."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer.cli import cli
from trainer.config import TrainConfig, parse_duration, parse_set, resolve
from trainer.errors import UserError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1.0e-3\nmicro-batch: 4\nmodel_overrides:\n  dropout: 0.1\n")
    cfg = resolve(str(path), {"micro_batch": 2, "model_overrides": {"n_layer": 3}})
    assert cfg.lr == 1e-3 and cfg.micro_batch == 2 and cfg.weight_decay == TrainConfig.weight_decay
    assert cfg.model_overrides == {"dropout": 0.1, "n_layer": 3}


def test_a_batch_flag_replaces_the_yamls_batch_in_either_form(tmp_path):
    """`pretrain --config configs/gpt25-fineweb10b.yaml --global-batch 2`: the recipe gives tokens, the flag
    sequences; the flag wins instead of both counting as given."""
    recipe = str(CONFIGS[0].parent / "gpt25-fineweb10b.yaml")
    assert resolve(recipe, {}).global_batch_tokens == 524288
    cfg = resolve(recipe, {"global_batch": 2})
    assert (cfg.global_batch, cfg.global_batch_tokens) == (2, None)
    path = tmp_path / "run.yaml"
    path.write_text("data: d\nglobal-batch: 64\n")
    cfg = resolve(str(path), {"global_batch_tokens": 4096})
    assert (cfg.global_batch, cfg.global_batch_tokens) == (None, 4096)
    with pytest.raises(UserError, match="give either --global-batch"):
        resolve(str(path), {"global_batch": 8, "global_batch_tokens": 4096})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_recipe_config_resolves(path):
    cfg = resolve(str(path), {})
    assert cfg.model and cfg.data and cfg.out.startswith("runs/")


def test_unknown_yaml_key_lists_valid_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1.0\n")
    with pytest.raises(UserError, match="learning_rate.*valid keys.*lr"):
        resolve(str(path), {})


def test_malformed_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        resolve(str(path), {})


def test_durations():
    assert parse_duration("24h") == 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90") == 90
    with pytest.raises(UserError, match="24h"):
        parse_duration("tomorrow")


def test_set_values_are_typed():
    assert parse_set(["n_layer=4", "dropout=0.1", "norm=rmsnorm", "bias=false"]) == {
        "n_layer": 4, "dropout": 0.1, "norm": "rmsnorm", "bias": False}
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_set(["n_layer"])


@pytest.mark.parametrize("args, message", [
    (["--micro-batch", "0"], "micro-batch must be a positive integer"),
    (["--lr", "1e-3", "--min-lr", "1e-2"], "min-lr <= lr"),
    (["--global-batch", "8", "--global-batch-tokens", "1024"], "not both"),
    (["--max-time", "soon"], "cannot read duration"),
    (["--resume", "/no/such/checkpoint"], "no such checkpoint"),
    (["--config", "/no/such.yaml"], "does not exist"),
    (["--hellaswag-every", "10"], "needs --hellaswag-jsonl"),
])
def test_pretrain_bad_options_fail_with_one_line(args, message, tmp_path):
    result = CliRunner().invoke(cli, ["pretrain", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # nothing written


def test_launcher_local_rank_is_accepted():
    # env: CliRunner restores LOCAL_RANK afterwards (the group exports it, and later in-process tests must
    # not look like rank 1 of a launch)
    result = CliRunner().invoke(cli, ["--local_rank=1", "pretrain", "--help"], env={"LOCAL_RANK": None})
    assert result.exit_code == 0 and "--global-batch" in result.output
