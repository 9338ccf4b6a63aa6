"""Config files, dotted overrides and the errors they give."""

from __future__ import annotations

import pytest

from dpokit.cli import main
from dpokit.config import load_config, parse_recipe_args, shipped_config_names
from dpokit.errors import DpokitError


def test_overrides_set_nested_keys_with_types():
    cfg = load_config("tiny_lora", ["optimizer.lr=1e-5", "lora.rank=16", "model.method=dora", "loss.beta=0.2"])
    assert cfg.optimizer.lr == 1e-5 and isinstance(cfg.optimizer.lr, float)
    assert cfg.lora.rank == 16
    assert cfg.model.method == "dora"
    assert cfg.loss == {"name": "dpo", "beta": 0.2}


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(DpokitError, match=r"unknown key optimizer\.lrr \(did you mean optimizer\.lr\?\); valid keys: optimizer\.name"):
        load_config(None, ["optimizer.lrr=1e-5"])


def test_wrong_type_names_the_key():
    with pytest.raises(DpokitError, match=r"lora\.rank must be an integer, got 'big'"):
        load_config(None, ["lora.rank=big"])


def test_bad_choice_lists_the_choices():
    with pytest.raises(DpokitError, match=r"model\.method='lorra' is not valid; choose one of: full, lora, dora, qlora, qdora"):
        load_config(None, ["model.method=lorra"])


def test_config_file_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("training:\n  max_steps: 7\n")
    assert load_config(str(path)).training.max_steps == 7
    with pytest.raises(DpokitError, match="unknown config 'nope'"):
        load_config("nope")


def test_recipe_args_take_config_and_overrides():
    cfg = parse_recipe_args(["--config", "tiny_lora", "training.max_steps=3"])
    assert cfg.training.max_steps == 3 and cfg.model.method == "lora"
    with pytest.raises(DpokitError, match="unexpected argument '--bogus'"):
        parse_recipe_args(["--bogus"])


def test_every_shipped_config_validates():
    names = shipped_config_names()
    assert "tiny_lora" in names
    for name in names:
        load_config(name)


def test_config_list_and_show(capsys):
    assert main(["config", "list"]) == 0
    assert "tiny_lora" in capsys.readouterr().out.split()
    assert main(["config", "show", "tiny_lora", "lora.rank=32"]) == 0
    shown = capsys.readouterr().out
    assert "rank: 32" in shown and "method: lora" in shown


def test_cli_error_is_one_line_without_traceback(capsys):
    assert main(["config", "show", "tiny_lora", "lora.rank=big"]) == 1
    err = capsys.readouterr().err
    assert "lora.rank must be an integer" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_flag_is_a_usage_error_not_a_traceback(capsys):
    assert main(["train", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert "No such option: --bogus" in err
    assert "Traceback" not in err
