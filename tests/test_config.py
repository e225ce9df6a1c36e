"""Config: defaults are the seed program's, overrides parse to the field's type, JSON round-trips."""

import json

import pytest

from cnnjax.cli import config_from_args, main
from cnnjax.config import Config, ModelConfig


def test_defaults_are_the_seed_programs():
    cfg = Config()
    assert cfg.data.dataset == "mnist5k"
    assert (cfg.optim.learning_rate, cfg.optim.weight_decay, cfg.optim.amsgrad) == (1e-3, 1e-5, True)
    assert (cfg.optim.plateau_factor, cfg.optim.plateau_patience, cfg.optim.min_lr) == (0.5, 3, 1e-6)
    assert cfg.train.early_stopping_patience == 7
    assert cfg.model.name == "seed_cnn" and cfg.model.kwargs == {}


def test_overrides_parse_each_type():
    cfg = Config().override(["optim.learning_rate=3e-4", "optim.amsgrad=false", "model.kwargs.features=16,32,64",
                             "model.kwargs.padding=same", "model.kwargs.padding=2", "data.manual_dir=/x/y",
                             "model.kwargs.dense=256", "model.kwargs.pool_stride=null", "train.epochs=3",
                             "data.classes=3", 'augment.kwargs={"my.aug:warp": {"alpha": 0.5}}'])
    assert cfg.optim.learning_rate == 3e-4 and cfg.optim.amsgrad is False
    assert cfg.model.kwargs == {"features": [16, 32, 64], "padding": 2, "dense": 256,
                                "pool_stride": None}
    assert cfg.data.manual_dir == "/x/y" and cfg.train.epochs == 3 and cfg.data.classes == (3,)
    assert Config().set("model.kwargs.padding", "same").model.kwargs == {"padding": "same"}
    assert cfg.get("model.kwargs.features") == [16, 32, 64]
    assert cfg.augment.kwargs == {"my.aug:warp": {"alpha": 0.5}}  # a name with dots: as JSON


def test_model_kwargs_reach_the_module_as_its_field_types():
    from cnnjax.nn.models import build_model

    model = build_model(Config().override(["model.kwargs.features=16,32", "model.kwargs.dense=64",
                                           "model.kwargs.padding=same"]).model, 10)
    assert (model.features, model.dense, model.padding) == ((16, 32), (64,), "same")
    with pytest.raises(ValueError, match="SeedCNN takes features, kernel_size"):
        build_model(Config().set("model.kwargs.featurs", "8").model, 10)


def test_an_earlier_config_json_reads_through_the_migration():
    """config.json as cnnjax wrote it before models became name + kwargs: the built-in model's
    fields move into model.kwargs where they differ from their defaults."""
    old = {"model": {"name": "seed_cnn", "kwargs": {}, "features": [8, 16], "kernel_size": 3,
                     "stride": 1, "padding": "same", "pool": "max", "pool_size": 2,
                     "pool_stride": None, "dense": [128], "dropout": 0.5, "conv_dropout": 0.0,
                     "batch_norm": False, "bn_momentum": 0.9, "conv_lowering": "auto",
                     "width": None, "stem": "imagenet", "grayscale": "repeat"}}
    assert Config.from_dict(old).model.kwargs == {"features": [8, 16], "padding": "same",
                                                  "dropout": 0.5}
    old["model"].update(name="resnet18", features=[32, 64], padding=1, dropout=0.0, width=16,
                        stem="small")
    assert Config.from_dict(old).model == ModelConfig("resnet18", {"width": 16, "stem": "small"})


def test_json_round_trip_restores_tuples_and_types():
    cfg = Config().override(["model.kwargs.features=8,16", "optim.learning_rate=2e-3",
                             "model.kwargs.padding=valid", "augment.kwargs.warp.alpha=2"])
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
    ("train.epoch=3", "did you mean 'train.epochs'"),
    ("model.dropout=0.5", "model.kwargs.dropout"),
    ("train.epochs.x=1", "not a dict field"),
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
