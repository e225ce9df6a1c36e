"""Config: defaults are the seed program's, overrides parse to the field's type, JSON round-trips."""

import json

import pytest

from cnnjax.cli import config_from_args, main
from cnnjax.config import Config


def test_defaults_are_the_seed_programs():
    cfg = Config()
    assert cfg.data.dataset == "mnist5k"
    assert (cfg.optim.learning_rate, cfg.optim.weight_decay, cfg.optim.amsgrad) == (1e-3, 1e-5, True)
    assert (cfg.optim.plateau_factor, cfg.optim.plateau_patience, cfg.optim.min_lr) == (0.5, 3, 1e-6)
    assert cfg.train.early_stopping_patience == 7
    assert cfg.model.features == (32, 64) and cfg.model.dense == (128,)


def test_overrides_parse_each_type():
    cfg = Config().override(["optim.learning_rate=3e-4", "optim.amsgrad=false", "model.features=16,32,64",
                             "model.padding=same", "model.padding=2", "data.manual_dir=/x/y",
                             "model.dense=256", "model.pool_stride=null", "train.epochs=3"])
    assert cfg.optim.learning_rate == 3e-4 and cfg.optim.amsgrad is False
    assert cfg.model.features == (16, 32, 64) and cfg.model.dense == (256,)
    assert cfg.model.padding == 2 and cfg.model.pool_stride is None
    assert cfg.data.manual_dir == "/x/y" and cfg.train.epochs == 3
    assert Config().set("model.padding", "same").model.padding == "same"


def test_json_round_trip_restores_tuples_and_types():
    cfg = Config().override(["model.features=8,16", "optim.learning_rate=2e-3", "model.padding=valid"])
    back = Config.from_dict(json.loads(cfg.to_json()))
    assert back == cfg


def test_config_is_frozen():
    with pytest.raises(Exception):
        Config().train.epochs = 3


@pytest.mark.parametrize("item, needle", [
    ("train.epoch=3", "train.epoch"),
    ("nosuch.x=1", "nosuch.x"),
    ("train.epochs", "section.field=value"),
    ("train.epochs=three", "train.epochs"),
    ("optim.amsgrad=2", "optim.amsgrad"),
])
def test_bad_overrides_name_the_key(item, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        Config().override([item])


def test_unknown_keys_in_saved_config_are_refused():
    d = Config().to_dict()
    d["train"]["epochz"] = 1
    with pytest.raises(ValueError, match="train.epochz"):
        Config.from_dict(d)


def test_cli_flags_map_to_config():
    import argparse
    args = argparse.Namespace(dataset="mnist", epochs=4, batch_size=32, seed=7, data_dir=None,
                              manual_dir="/m", overrides=["optim.learning_rate=1e-2"], quiet=True)
    cfg = config_from_args(args)
    assert (cfg.data.dataset, cfg.train.epochs, cfg.train.batch_size, cfg.train.seed) == ("mnist", 4, 32, 7)
    assert cfg.data.manual_dir == "/m" and cfg.optim.learning_rate == 1e-2 and not cfg.train.progress


def test_cli_reports_bad_override_without_traceback(capsys):
    assert main(["train", "--set", "train.nope=1", "--quiet"]) == 2
    assert "train.nope" in capsys.readouterr().err
