"""The app's ``crown_ibp_ours`` (Loss Landscape Matters' CROWN-IBP with optimised ReLU slopes): the three llm_*
recipes load with the original's parameters and run a few steps on digits; the frozen_dict schedule; the
method's parameter checks; and (slow) verified accuracy after training against plain CROWN-IBP."""
import math

import pytest
import torch

from robustkern.bounds import BoundedModule, margin_spec
from robustkern_cli.config import load_config
from robustkern_cli.data import load_dataset, make_loader
from robustkern_cli.errors import ConfigError
from robustkern_cli.evaluate import fill_all_defaults, model_from_config
from robustkern_cli.losses import frozen_layers
from robustkern_cli.train import train

RECIPES = ["llm_mnist_0.4", "llm_cifar10_8_255", "llm_svhn_0.01"]
ON_DIGITS = ["data:dataset=digits", "data:augment=none", "data:num_train=48", "data:batch_size=16", "training_params:epochs=2", "training_params:schedule_start=0",
             "training_params:schedule_length=1", "training_params:epsilon=0.05", "training_params:eval_every=0",
             "eval_params:epsilon=0.05", "eval_params:num_examples=32"]


def cfg_for(name, *overrides):
    return load_config(name, overrides, fill_defaults=fill_all_defaults)


def on_digits(name, *overrides):
    """The recipe with digits' data and its small CNN (the recipes' models are for 28x28 and 32x32 images)."""
    if name == "llm_svhn_0.01":     # its model normalises SVHN's 3 channels
        overrides = ("model:kwargs:mean=[0.3]", "model:kwargs:std=[0.4]") + overrides
    cfg = cfg_for(name, *ON_DIGITS, *overrides)
    cfg["model"] = {"name": "digits_cnn", "kwargs": {}}
    return cfg


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_with_the_original_parameters(name):
    mp = cfg_for(name)["training_params"]["method_params"]
    assert cfg_for(name)["training_params"]["method"] == "crown_ibp_ours"
    assert (mp["relaxation"], mp["slope_steps"], mp["slope_step"], mp["bound_type"]) == ("ours", 1, 2.0,
                                                                                          "crown-interval")
    assert (mp["final_kappa"], mp["final_beta"], mp["bounded_input"]) == (0.0, 1.0, False)
    assert frozen_layers(mp["frozen_dict"], 0) == 13 and frozen_layers(mp["frozen_dict"], 140) == 0


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_on_digits(tmp_path, name):
    """Two epochs of the recipe (its method and parameters, digits' data and model): the robust loss is the
    optimised-slope one (the step's loss below the loss at the random slopes on the logged batches)."""
    cfg = on_digits(name)
    res = train(cfg, tmp_path / name, progress=False, log=lambda s: None)
    assert len(res.history) == 2
    last = res.history[-1]
    assert last["eps"] == pytest.approx(0.05) and math.isfinite(last["train_loss"])
    assert 0.0 <= last["train_verified_acc"] <= 1.0


@pytest.mark.parametrize("relaxation,bound_type,steps,step", [("ours", "crown-interval-frozen", 7, 0.1),
                                                              ("binary", "crown-interval", 1, 2.0),
                                                              ("same-slope", "crown-interval", 1, 2.0)])
def test_variants_train_on_digits(tmp_path, relaxation, bound_type, steps, step):
    p = "training_params:method_params:"
    cfg = on_digits("llm_mnist_0.4", "training_params:epochs=1", f"{p}relaxation={relaxation}",
                  f"{p}bound_type={bound_type}", f"{p}slope_steps={steps}", f"{p}slope_step={step}")
    cfg["training_params"]["method_params"]["frozen_dict"] = {"0": 2}
    res = train(cfg, tmp_path / relaxation, progress=False, log=lambda s: None)
    assert math.isfinite(res.history[-1]["train_loss"])
    if bound_type == "crown-interval-frozen":
        assert res.history[-1]["train_frozen"] == 2


def test_frozen_schedule_is_the_originals():
    """train.py: ``frozen`` is the value of the last key <= the epoch (from 0), 13 before the first key."""
    fd = cfg_for("llm_mnist_0.4")["training_params"]["method_params"]["frozen_dict"]
    want = {0: 13, 9: 13, 10: 13, 19: 13, 20: 12, 55: 9, 139: 1, 140: 0, 399: 0}
    assert {t: frozen_layers(fd, t) for t in want} == want
    assert frozen_layers({"5": 3, "1": 7}, 0) == 7 and frozen_layers({"5": 3, "1": 7}, 6) == 3


@pytest.mark.parametrize("override,match", [
    ("relaxation=optimal", "relaxation"), ("bound_type=interval", "bound_type"), ("slope_steps=-1", "slope_steps"),
    ("slope_step=0", "slope_step"), ("bounded_input=maybe", "bounded_input"),
    ("final_beta=2", "final_beta")])
def test_bad_parameters_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        cfg_for("llm_mnist_0.4", "training_params:method_params:" + override)


def _verified(model, eps):
    ds = load_dataset("digits", "test")
    x, y = next(iter(make_loader(ds, len(ds))))
    model.eval()
    bm = BoundedModule(model, x[:1])
    with torch.no_grad():
        lb, _ = bm.compute_bounds(x, eps, method="CROWN-IBP", C=margin_spec(y, 10), bound_upper=False)
    return (lb > 0).all(1).float().mean().item()


COMPARED = ["training_params:method_params:bound_type=crown-interval", "training_params:method_params:init_kappa=1",
            "training_params:method_params:final_kappa=0.5", "training_params:method_params:final_beta=1",
            "data:num_train=500"]


@pytest.mark.slow
def test_optimised_slopes_verify_at_least_as_many_digits_as_crown_ibp(tmp_path):
    """The same schedule and seed (8 epochs, eps 0.1 ramped over 4, kappa 0, beta 1) with CROWN-IBP's adaptive
    slopes and with the one-step optimised slopes: CROWN-IBP-verified test accuracy at eps 0.1."""
    common = ["training_params:epochs=4", "training_params:schedule_start=1", "training_params:schedule_length=2",
              "training_params:epsilon=0.05", "training_params:lr=0.003", "training_params:eval_every=0",
              "data:batch_size=64", "data:augment=none"]
    got = {}
    for method in ("crown_ibp", "crown_ibp_ours"):
        cfg = cfg_for("digits_ibp", f"training_params:method={method}", *common, *COMPARED)
        torch.manual_seed(cfg["seed"])
        train(cfg, tmp_path / method, progress=False, log=lambda s: None)
        model = model_from_config(cfg, tmp_path / method / "checkpoint.pt")
        got[method] = _verified(model, 0.05)
    print(f"CROWN-IBP-verified digits test accuracy at eps 0.05: {got}")
    assert got["crown_ibp_ours"] >= got["crown_ibp"], got


def test_bad_frozen_dict_is_a_config_error():
    from robustkern_cli.losses import _check_llm
    mp = dict(cfg_for("llm_mnist_0.4")["training_params"]["method_params"])
    for bad in ({"a": 1}, {}, {"10": -1}, {"10": True}):
        with pytest.raises(ConfigError, match="frozen_dict must map epochs"):
            _check_llm({}, dict(mp, frozen_dict=bad))
