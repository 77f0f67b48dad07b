import pytest

from instanas.config import (
    ConfigError,
    apply_overrides,
    load_config_file,
    load_preset,
    preset_names,
    to_yaml,
)


def test_presets_load():
    assert {"fashion-cpu", "paper-cifar", "paper-tiny", "paper-imagenet"} <= set(preset_names())
    for name in preset_names():
        assert load_preset(name).preset == name


def test_overrides_are_typed():
    config = apply_overrides(
        load_preset("fashion-cpu"),
        {
            "pretrain.epochs": "3",
            "space.width": "0.5",
            "data.root": "/tmp/x",
            "space.stages": "[[16, 1, 1], [24, 2, 2]]",
            "channels_last": "false",
            "latency.eval_images": "none",
            "controller.lr": "3e-3",
        },
    )
    assert config.controller.lr == 0.003
    assert config.pretrain.epochs == 3 and config.space.width == 0.5
    assert config.data.root == "/tmp/x" and config.space.stages == [[16, 1, 1], [24, 2, 2]]
    assert config.channels_last is False and config.latency.eval_images is None


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("pretrain.epoch", "3", "did you mean 'pretrain.epochs'"),
        ("pretrain.epochs", "0", "greater than 0"),
        ("search.epochs", "-2", "greater than 0"),
        ("pretrain.epochs", "two", "whole number"),
        ("controller.window", "dynamik", "did you mean 'dynamic'"),
        ("data.val_fraction", "0.9", "at most 0.5"),
        ("space.stages", "[[16, 1]]", "channels, cells, stride"),
        ("latency.repeats", "10", "at least 30"),
    ],
)
def test_bad_overrides(key, value, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(load_preset("fashion-cpu"), {key: value})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'fashion'"):
        load_preset("fashion")


def test_yaml_round_trip(tmp_path):
    config = apply_overrides(load_preset("paper-cifar"), {"search.epochs": "7"})
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(config))
    assert load_config_file(path) == config
