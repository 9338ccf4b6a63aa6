"""Config files, dotted overrides and the errors they give."""

from __future__ import annotations

import typing
from typing import Any, Optional

import pytest

from dpokit.cli import main
from dpokit.config import (
    LOSS_FLAGS,
    SETTINGS,
    TrainConfig,
    changes_meaning,
    config_to_dict,
    load_config,
    parse_recipe_args,
    shipped_config_names,
    torchtune_keys,
)
from dpokit.errors import DpokitError
from dpokit.typed_text import written


def test_overrides_set_nested_keys_with_types():
    cfg = load_config("tiny_lora", ["optimizer.lr=1e-5", "lora.rank=16", "model.method=dora", "loss.beta=0.2"])
    assert cfg.optimizer.lr == 1e-5 and isinstance(cfg.optimizer.lr, float)
    assert cfg.lora.rank == 16
    assert cfg.model.method == "dora"
    assert cfg.loss == {"name": "dpo", "beta": 0.2}


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(
        DpokitError, match=r"unknown key optimizer\.lrr \(did you mean optimizer\.lr\?\); valid keys: optimizer\.name"
    ):
        load_config(None, ["optimizer.lrr=1e-5"])


def test_wrong_type_names_the_key():
    with pytest.raises(DpokitError, match=r"lora\.rank must be an integer, got 'big'"):
        load_config(None, ["lora.rank=big"])


def test_bad_choice_lists_the_choices():
    with pytest.raises(
        DpokitError, match=r"model\.method='lorra' is not valid; choose one of: full, lora, dora, qlora, qdora"
    ):
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


# ---------------------------------------------------------------------------------------------
# One schema: every value read by its declared type


def _value(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _string_settings():
    return [s for s in SETTINGS.values() if s.hint in (str, Optional[str])]


def test_every_key_of_every_shipped_config_round_trips_through_an_override():
    for name in shipped_config_names():
        cfg = load_config(name)
        overrides = [f"{s.key}={written(s.hint, _value(cfg, s.key))}" for s in SETTINGS.values() if s.key != "loss"]
        overrides += [f"loss.{param}={written(Any, value)}" for param, value in cfg.loss.items() if param != "name"]
        again = load_config(name, overrides)
        assert config_to_dict(again) == config_to_dict(cfg), name


@pytest.mark.parametrize("text", ["007", "1e3", "0x10", "true", "null", "~", "no", "[a, b]", "1,2", " spaced "])
def test_string_keys_keep_what_yaml_would_turn_into_other_values(text):
    strings = _string_settings()
    assert {s.key for s in strings} >= {"model.path", "model.tokenizer", "output.dir", "logging.run_name"}
    apart = {"reference.model"}  # names the reference as reference.adapter does: one or the other, with a cache
    cfg = load_config("tiny_lora", [f"{s.key}={written(s.hint, text)}" for s in strings if s.key not in apart])
    for s in strings:
        if s.key not in apart:
            assert _value(cfg, s.key) == text, s.key
    for key in apart:
        s = next(s for s in strings if s.key == key)
        assert (
            _value(load_config("tiny_lora", [f"{key}={written(s.hint, text)}", "reference.source=cache"]), key) == text
        )


def test_a_string_override_is_the_text_as_written():
    cfg = load_config(None, ["model.path=007", "output.dir=1e3", "model.tokenizer=0x10", "logging.run_name=true"])
    assert (cfg.model.path, cfg.output.dir, cfg.model.tokenizer, cfg.logging.run_name) == ("007", "1e3", "0x10", "true")
    cfg = load_config(None, ["logging.run_name=null", "model.tokenizer=~"])
    assert cfg.logging.run_name is None and cfg.model.tokenizer is None
    assert load_config(None, ["logging.run_name='null'"]).logging.run_name == "null"


def test_a_config_file_keeps_its_strings_as_written(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "model:\n  path: 007\n  tokenizer: 'null'\noutput:\n  dir: 1e3\nlogging:\n  run_name: ~\n"
        "optimizer:\n  lr: 1e-5\n  betas: [0.9, 0.95]\nloss:\n  name: dpo\n  beta: 1e-1\n"
    )
    cfg = load_config(str(path))
    assert (cfg.model.path, cfg.model.tokenizer, cfg.output.dir, cfg.logging.run_name) == ("007", "null", "1e3", None)
    assert cfg.optimizer.lr == 1e-5 and cfg.optimizer.betas == [0.9, 0.95]
    assert cfg.loss == {"name": "dpo", "beta": 0.1}


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.rank=1e3", r"lora\.rank must be an integer, got '1e3'"),
        ("lora.rank=16.5", r"lora\.rank must be an integer"),
        ("optimizer.lr=fast", r"optimizer\.lr must be a number, got 'fast'"),
        ("data.shuffle=maybe", r"data\.shuffle must be true or false, got 'maybe'"),
        ("optimizer.betas=[0.9]", r"optimizer\.betas must have 2 values"),
        ("optimizer.betas=[0.9,1.5]", r"optimizer\.betas\[1\]=1\.5 is out of range"),
        ("logging.report_to=[wandb,tensorbord]", r"logging\.report_to\[1\]='tensorbord' is not valid; choose one of"),
        ("training.max_steps=0", r"training\.max_steps=0 is out of range; it must be >= 1 \(or null to run"),
        ("loss.beta=high", r"loss\.beta must be a number, got 'high'"),
        ("optimizer=adamw", r"optimizer is a section: set its keys"),
    ],
)
def test_values_are_read_strictly_by_their_declared_type(override, message):
    with pytest.raises(DpokitError, match=message):
        load_config(None, [override])


def test_loss_parameters_are_read_by_the_loss_constructors_types():
    cfg = load_config(
        None, ["loss=[dpo,sft]", "loss.weights=1,0.5", "loss.beta=1e-1", "loss.wpo=yes", "loss.normalize=pair"]
    )
    assert cfg.loss == {"name": ["dpo", "sft"], "weights": [1.0, 0.5], "beta": 0.1, "wpo": True, "normalize": "pair"}
    assert load_config(None, ["loss=rso", "loss.gamma=2"]).loss == {"name": "rso", "gamma": 2.0}


def test_every_declared_key_is_a_real_field_and_every_table_names_declared_keys():
    from dpokit.cli import TRAIN_FLAGS
    from dpokit.losses import LOSSES, loss_parameters
    from dpokit.torchtune_config import WHY

    defaults = TrainConfig()
    for s in SETTINGS.values():
        _value(defaults, s.key)  # raises for a key that is not a field
        assert s.doc, f"{s.key} has no doc"
        assert s.hint not in (Any,), s.key
        assert (typing.get_origin(s.hint) is typing.Union) == bool(s.null) or s.key == "reference.cache", s.key
    flag_keys = {flag.key for flag in TRAIN_FLAGS}
    assert {s.key for s in SETTINGS.values() if s.flag} <= flag_keys
    all_params = {p for cls in LOSSES.values() for p in loss_parameters(cls)}
    for _, param, _, _ in LOSS_FLAGS:
        assert param in all_params, param
    for tt_key, key in torchtune_keys().items():
        assert key in SETTINGS and tt_key not in WHY, tt_key
    assert len({flag.option for flag in TRAIN_FLAGS}) == len(TRAIN_FLAGS)


def test_resume_counts_a_key_it_does_not_know_as_a_change_of_meaning():
    from dpokit.run_dir import config_changes

    saved = config_to_dict(load_config("tiny_lora"))
    now = config_to_dict(load_config("tiny_lora", ["training.log_every=5", "data.packing=false"]))
    assert config_changes(saved, now) == []  # declared meaning=False
    now = config_to_dict(load_config("tiny_lora", ["optimizer.eps=1e-6", "training.seed=1"]))
    assert config_changes(saved, now) == ["optimizer.eps: 1e-08 -> 1e-06", "training.seed: 42 -> 1"]
    saved["data"]["retired_key"] = 3  # a key another dpokit wrote
    assert config_changes(saved, config_to_dict(load_config("tiny_lora"))) == ["data.retired_key: 3 -> None"]
    assert changes_meaning("loss.new_param") and not changes_meaning("output.dir")


def test_config_keys_lists_every_key_with_its_doc(capsys):
    assert main(["config", "keys"]) == 0
    shown = capsys.readouterr().out
    for s in SETTINGS.values():
        assert s.key in shown
    assert main(["config", "keys", "optimizer"]) == 0
    shown = capsys.readouterr().out
    assert "optimizer.lr" in shown and "Peak learning rate" in shown and "--lr" in shown and "model.path" not in shown


def test_an_error_names_the_file_a_value_came_from_and_no_file_for_an_override(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("lora:\n  rank: 0\n")
    with pytest.raises(DpokitError, match=rf"^{path}: lora\.rank=0 is out of range"):
        load_config(str(path))
    with pytest.raises(DpokitError, match=r"^lora\.rank=0 is out of range"):
        load_config("tiny_lora", ["lora.rank=0"])
