"""robustkern_cli.config: defaults, base chains, validation, typed overrides, and every shipped recipe."""
import json
import re

import pytest

from robustkern_cli.config import (CONFIG_DIR, apply_overrides, list_configs, load_config, parse_override,
                                   read_config_file)
from robustkern_cli.data import DATASETS, dataset_info
from robustkern_cli.errors import ConfigError
from robustkern_cli.evaluate import EVALS
from robustkern_cli.losses import LOSSES, METHOD_DEFAULTS
from robustkern_cli.evaluate import fill_all_defaults as _fill_all
from robustkern.models import MODEL_NAMES, model_kwargs


def load(name, *overrides):
    return load_config(name, overrides, fill_defaults=_fill_all)


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_parse_override_plain_and_nested():
    assert parse_override("training_params:epsilon=0.007843") == (("training_params", "epsilon"), "0.007843")
    assert parse_override("training_params:method_params:bound_type=interval") == (
        ("training_params", "method_params", "bound_type"), "interval")
    assert parse_override("eval_params:checkpoint=a=b.pt") == (("eval_params", "checkpoint"), "a=b.pt")
    with pytest.raises(ConfigError, match="section:key=value"):
        parse_override("training_params:epochs")


def test_defaults_lie_under_a_recipe_and_name_comes_from_the_file():
    cfg = load("digits_standard")
    assert cfg["name"] == "digits_standard"
    assert cfg["training_params"]["optimizer"] == "adam"  # from the recipe
    assert cfg["training_params"]["lr_gamma"] == 0.1  # from defaults.json
    assert cfg["output"]["dir"] == "runs"


def test_base_chain_merges_and_child_wins():
    cfg = load("cifar_ibp_2_255")  # -> cifar_crown_ibp_2_255 -> cifar_crown_ibp_8_255
    tp = cfg["training_params"]
    assert tp["method"] == "ibp" and tp["method_params"]["bound_type"] == "interval"
    assert tp["epsilon"] == pytest.approx(2.2 / 255, rel=1e-6)  # from the 2/255 parent
    assert tp["epochs"] == 3200 and tp["schedule_type"] == "smoothed"  # from the 8/255 grandparent
    assert cfg["eval_params"]["epsilon"] == pytest.approx(2 / 255, rel=1e-3)
    assert cfg["model"]["kwargs"]["mean"] == [0.4914, 0.4822, 0.4465]


def test_override_typing_follows_current_value():
    cfg = load("digits_ibp",
               "training_params:epochs=3",                        # int
               "training_params:epsilon=8/255",                   # float, fraction
               "training_params:lr=1e-2",                         # float
               "training_params:nesterov=yes",                    # bool
               "data:shuffle_train=0",                            # bool
               "training_params:optimizer=sgd",                   # str
               "training_params:lr_milestones=[5, 8]",            # list, JSON
               "eval_params:checkpoint=runs/x/checkpoint.pt")     # str with a slash
    tp = cfg["training_params"]
    assert tp["epochs"] == 3 and isinstance(tp["epochs"], int)
    assert tp["epsilon"] == pytest.approx(8 / 255)
    assert tp["lr"] == 0.01
    assert tp["nesterov"] is True and cfg["data"]["shuffle_train"] is False
    assert tp["optimizer"] == "sgd"
    assert tp["lr_milestones"] == [5, 8]
    cfg = load("digits_standard", "training_params:lr_milestones=130,190")  # list, comma-separated
    assert cfg["training_params"]["lr_milestones"] == [130, 190]


def test_nested_method_param_override_and_method_defaults():
    cfg = load("digits_ibp", "training_params:method_params:bound_type=crown-interval",
               "training_params:method_params:final_kappa=0")
    mp = cfg["training_params"]["method_params"]
    assert mp["bound_type"] == "crown-interval"
    assert mp["final_kappa"] == 0.0 and isinstance(mp["final_kappa"], float)
    assert mp["final_beta"] == METHOD_DEFAULTS["ibp"]["final_beta"]  # filled from the method's defaults


def test_method_override_fills_its_defaults_whatever_the_order():
    cfg = load("digits_standard", "training_params:method_params:sigma=0.5", "training_params:method=gaussian")
    assert cfg["training_params"]["method"] == "gaussian"
    assert cfg["training_params"]["method_params"]["sigma"] == 0.5


def test_unknown_key_error_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as exc:
        load("digits_standard", "training_params:epoch=3")
    msg = str(exc.value)
    assert "'training_params:epoch'" in msg and "did you mean 'epochs'" in msg
    assert "valid keys in training_params:" in msg and "lr_milestones" in msg and "method_params" in msg
    with pytest.raises(ConfigError, match=r"unknown config key 'trainig_params'.*training_params"):
        load("digits_standard", "trainig_params:epochs=3")
    with pytest.raises(ConfigError, match=r"'training_params:method_params:kapa'.*final_kappa.*init_kappa"):
        load("digits_ibp", "training_params:method_params:kapa=0.1")


def test_bad_values_and_sections_are_errors():
    with pytest.raises(ConfigError, match=r"training_params:epochs.*expected int"):
        load("digits_standard", "training_params:epochs=ten")
    with pytest.raises(ConfigError, match=r"expected bool"):
        load("digits_standard", "data:shuffle_train=maybe")
    with pytest.raises(ConfigError, match="is a section"):
        load("digits_standard", "training_params=3")
    with pytest.raises(ConfigError, match="is a value"):
        load("digits_standard", "seed:x=1")


_TP = "training_params:method_params:"


@pytest.mark.parametrize("recipe, overrides, needle", [
    ("digits_standard", ["training_params:optimizer=rmsprop"], "training_params:optimizer"),
    ("digits_standard", ["training_params:lr_schedule=linear"], "training_params:lr_schedule"),
    ("digits_standard", ["training_params:lr_schedule=step"], "lr_step > 0"),
    ("digits_standard", ["training_params:schedule_type=cosine"], "training_params:schedule_type"),
    ("digits_standard", ["training_params:schedule_length=0"], "training_params:schedule_length"),
    ("digits_standard", ["data:augment=rotate"], "data:augment"),
    ("digits_standard", ["training_params:grad_sync=nccl"], "training_params:grad_sync"),
    ("digits_ibp", ["training_params:norm=1"], "training_params:norm"),
    ("digits_standard", ["eval_params:method=pgd", "eval_params:norm=l1"], "eval_params:norm"),
    ("digits_standard", ["eval_params:method=fgsm"], "unknown evaluation method"),
    ("digits_ibp", [_TP + "bound_type=zonotope"], _TP + "bound_type"),
    ("digits_ibp", [_TP + "final_kappa=1.5"], _TP + "final_kappa"),
    ("digits_standard", ["training_params:method=macer", _TP + "deferred=true"], "deferred"),
    ("digits_standard", ["training_params:method=smoothadv", _TP + "attack=DDN"], _TP + "attack"),
    ("digits_standard", ["training_params:method=trades_rs", _TP + "distance=l_inf"], _TP + "distance"),
    ("digits_standard", ["training_params:method=pgd", _TP + "steps_rule=auto"], _TP + "steps_rule"),
    ("digits_standard", ["training_params:method=trades", _TP + "distance=l_1"], _TP + "distance"),
    ("digits_standard", ["training_params:method=lfr", _TP + "norm=l_1"], _TP + "norm"),
    ("digits_standard", ["training_params:method=grad_norm", _TP + "p=3"], _TP + "p"),
    ("digits_standard", ["training_params:method=grad_norm", _TP + "h=0.1"], _TP + "h"),
])
def test_names_and_method_parameters_are_checked_when_the_config_loads(recipe, overrides, needle):
    """A value the training, evaluation or a method cannot take is refused where it enters, by load_config, not
    when the loop or the loss first meets it."""
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load(recipe, *overrides)


def test_recipe_files_are_validated(tmp_path):
    bad_key = write(tmp_path / "bad_key.json", {"training_params": {"epoch": 3}})
    with pytest.raises(ConfigError, match="'training_params:epoch'"):
        load(bad_key)
    bad_type = write(tmp_path / "bad_type.json", {"training_params": {"epochs": "3"}})
    with pytest.raises(ConfigError, match="must be of type int"):
        load(bad_type)
    ok = write(tmp_path / "ok.json", {"_note": "documentation keys are free", "training_params": {"lr": 1}})
    assert load(ok)["training_params"]["lr"] == 1  # an int is a valid float


def test_base_resolution_and_loops(tmp_path):
    write(tmp_path / "parent.json", {"base": "digits_standard.json", "training_params": {"epochs": 7, "lr": 0.5}})
    child = write(tmp_path / "child.json", {"base": "parent.json", "training_params": {"lr": 0.25}})
    cfg = load(child)
    assert (cfg["training_params"]["epochs"], cfg["training_params"]["lr"]) == (7, 0.25)
    assert cfg["model"]["name"] == "digits_cnn"  # from the shipped recipe found in the config directory
    assert "base" not in read_config_file(child)
    write(tmp_path / "a.json", {"base": "b.json"})
    write(tmp_path / "b.json", {"base": "a.json"})
    with pytest.raises(ConfigError, match="loops"):
        load(tmp_path / "a.json")
    with pytest.raises(ConfigError, match="not found"):
        load("no_such_recipe")


def test_apply_overrides_on_a_plain_dict():
    cfg = {"a": {"b": 1.0, "c": None}}
    apply_overrides(cfg, ["a:b=3", "a:c=[1, 2]"])
    assert cfg == {"a": {"b": 3.0, "c": [1, 2]}}


SHIPPED = list_configs()


def test_the_promised_recipes_are_shipped():
    expected = {"mnist_ibp_0.3", "mnist_ibp_0.4", "mnist_crown_ibp_0.3", "mnist_crown_ibp_0.4", "cifar_ibp_2_255",
                "cifar_ibp_8_255", "cifar_crown_ibp_2_255", "cifar_crown_ibp_8_255", "macer_0.25", "macer_0.5",
                "macer_1.0", "cohen_gaussian_0.25", "cohen_gaussian_0.5", "cohen_gaussian_1.0", "smoothadv_0.12",
                "trades_rs_cifar_2_255", "lfr_mnist_0.3", "pgd_at_mnist_0.3", "pgd_at_cifar_8_255",
                "trades_mnist_0.3", "extended_at_mnist_0.4", "digits_standard", "digits_ibp"}
    assert expected <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads(name):
    raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    assert isinstance(raw.get("_source"), str) and len(raw["_source"]) > 40, "each recipe cites its source"
    cfg = load(name)
    assert cfg["model"]["name"] in MODEL_NAMES
    assert set(cfg["model"]["kwargs"]) <= set(model_kwargs(cfg["model"]["name"]))
    assert dataset_info(cfg["data"]["dataset"]).name in DATASETS
    assert cfg["training_params"]["method"] in LOSSES
    assert cfg["eval_params"]["method"] in EVALS
    assert set(METHOD_DEFAULTS[cfg["training_params"]["method"]]) <= set(cfg["training_params"]["method_params"])
    assert cfg["training_params"]["epsilon"] >= cfg["training_params"]["starting_epsilon"]
