"""Recipes: typed validation, --set overrides, every shipped recipe loads."""
from __future__ import annotations

from pathlib import Path

import pytest

from mobilevit_deploy.errors import UserError
from mobilevit_deploy.train.config import TrainConfig, config_from_dict, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    for n in ("mobilevit_xxs_imagenet.yaml", "mobilevit_xs_imagenet.yaml", "mobilevit_s_imagenet.yaml",
              "cmt_ti_imagenet.yaml", "mobilevit_xxs_cifar10.yaml", "cmt_ti_cifar10.yaml"):
        assert n in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_names_a_registered_model(path):
    from mobilevit_deploy.models import list_models

    cfg = load_recipe(path)
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.name in list_models()
    assert all(s % cfg.data.size_divisor == 0 for s in cfg.data.train_sizes)


def test_mobilevit_imagenet_recipe_has_paper_settings():
    root = RECIPES[0].parent
    for name in ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s"):
        c = load_recipe(root / f"{name}_imagenet.yaml")
        assert c.model.name == name
        assert (c.optim.name, c.optim.lr, c.optim.weight_decay) == ("adamw", 0.002, 0.01)
        assert (c.schedule.warmup_init_lr, c.schedule.min_lr, c.schedule.epochs) == (0.0002, 0.0002, 300)
        assert c.schedule.kind == "cosine" and c.label_smoothing == 0.1 and c.ema.enabled
        assert c.data.train_sizes == [160, 192, 256, 288, 320] and c.data.variable_batch


def test_unknown_key_is_named_with_valid_keys():
    with pytest.raises(UserError) as e:
        config_from_dict({"optim": {"lr": 0.1, "weight_decy": 0.1}})
    msg = str(e.value)
    assert "optim.weight_decy" in msg and "weight_decay" in msg and "lr" in msg
    with pytest.raises(UserError, match="'epoch'.*valid keys.*schedule"):
        config_from_dict({"epoch": 3})


def test_wrong_type_is_an_error():
    with pytest.raises(UserError, match="schedule.epochs.*integer"):
        config_from_dict({"schedule": {"epochs": "ten"}})
    with pytest.raises(UserError, match="ema.enabled"):
        config_from_dict({"ema": {"enabled": "yes please"}})
    with pytest.raises(UserError, match="train_sizes.*multiple of 32"):
        config_from_dict({"data": {"train_sizes": [100]}})


def test_set_overrides_any_field(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: {name: mobilevit_xxs}\nschedule: {epochs: 10}\n")
    c = load_recipe(p, ["schedule.epochs=3", "data.train_sizes=[64, 96]", "optim.lr=1e-3", "ema.enabled=true",
                        "seed=7"])
    assert c.schedule.epochs == 3 and c.data.train_sizes == [64, 96] and c.optim.lr == 1e-3
    assert c.ema.enabled is True and c.seed == 7
    with pytest.raises(UserError, match="optim.lrr"):
        load_recipe(p, ["optim.lrr=1"])
    with pytest.raises(UserError, match="key=value"):
        load_recipe(p, ["optim.lr"])


def test_bad_yaml_and_missing_recipe(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(p)
