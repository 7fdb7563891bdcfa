"""Configuration layering and validation: every bad key or value is named."""
from __future__ import annotations

import pytest

from sensitune.engine.config import RECIPES, TrainConfig, build_config


def test_layers_defaults_method_file_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nlr: 0.02\nbetas: [0.8, 0.9]\ngrad_clip: 1.0\n")
    cfg = build_config({"lr": 5e-3, "weight_decay": 0.0, "batch_size": 16}, f, {"lr": 0.5, "epochs": None})
    assert cfg.epochs == 7  # file beats default, a None override is "not given"
    assert cfg.lr == 0.5  # override beats file beats method
    assert cfg.weight_decay == 0.0 and cfg.batch_size == 16  # method beats default
    assert cfg.betas == (0.8, 0.9) and cfg.grad_clip == 1.0
    assert cfg.seed == TrainConfig().seed


def test_unknown_key_in_file_is_named_with_a_suggestion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown config key 'learning_rat'"):
        build_config(config=f)
    with pytest.raises(ValueError, match=r"overrides: unknown config key 'epoch' \(did you mean 'epochs'\?\)"):
        build_config(overrides={"epoch": 3})


@pytest.mark.parametrize("key,value,match", [
    ("epochs", 0, "epochs=0 is invalid"),
    ("epochs", 2.5, "wrong type"),
    ("lr", "fast", "wrong type"),
    ("lr", -1.0, "positive"),
    ("precision", "fp8", "choose one of"),
    ("protocol", "test", "choose one of"),
    ("label_smoothing", 1.0, r"\[0, 1\)"),
    ("betas", [0.9], "wrong type"),
    ("progress", "maybe", "wrong type"),
    ("batch_size", None, "cannot be null"),
])
def test_bad_values(key, value, match):
    with pytest.raises(ValueError, match=match):
        build_config(overrides={key: value}) if value is not None else build_config(config={key: value})


def test_recipes_and_file_errors(tmp_path):
    cfg = build_config(config="paper")
    assert (cfg.epochs, cfg.warmup_epochs, cfg.batch_size, cfg.drop_path) == (100, 10, 64, 0.1)
    assert set(RECIPES) >= {"paper", "mini"}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_config(config=tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        build_config(config=bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        build_config(config=broken)


def test_protocol_decides_splits_and_method_options_merge():
    assert build_config().splits() == ("train800", "val200")
    assert build_config(overrides={"protocol": "final"}).splits() == ("train800val200", "test")
    assert build_config(overrides={"eval_split": "test"}).splits() == ("train800", "test")
    cfg = build_config({"method_options": {"rank": 8, "alpha": 1}}, {"method_options": {"rank": 4}})
    assert cfg.method_options == {"rank": 4, "alpha": 1}
    assert build_config(overrides={"progress": "false"}).progress is False
