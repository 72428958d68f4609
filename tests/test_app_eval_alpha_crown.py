"""``robustkern eval`` with the CROWN and alpha-CROWN evaluation methods: on an IBP-trained digits model the
verified accuracies (digits_mlp) are ordered as the bounds are (IBP <= CROWN <= alpha-CROWN, CROWN-IBP <= alpha-CROWN), the
alpha-CROWN parameters are auto_LiRPA's optimize_bound_args, checked when the config loads."""
import pytest
import torch

from robustkern_cli.config import load_config
from robustkern_cli.errors import ConfigError
from robustkern_cli.evaluate import describe, evaluate, fill_all_defaults
from robustkern_cli.main import main
from robustkern_cli.train import train


def cfg_for(name, *overrides):
    return load_config(name, overrides, fill_defaults=fill_all_defaults)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ibp")
    cfg = cfg_for("digits_ibp", "model:name=digits_mlp", "training_params:epochs=4", "training_params:schedule_start=0",
                  "training_params:schedule_length=2", "training_params:epsilon=0.05", "training_params:eval_every=0")
    torch.manual_seed(cfg["seed"])
    train(cfg, out, progress=False, log=lambda s: None)
    return out / "checkpoint.pt"


def test_verified_accuracies_are_ordered_as_the_bounds(checkpoint):
    got = {}
    for method in ("ibp", "crown_ibp", "crown", "alpha_crown"):
        cfg = cfg_for("digits_ibp", "model:name=digits_mlp", f"eval_params:method={method}", "eval_params:epsilon=0.05",
                      "eval_params:num_examples=40",
                      "eval_params:method_params:iteration=8" if method == "alpha_crown" else "seed=0")
        res = evaluate(cfg, checkpoint)
        got[method] = res["verified_acc"]
        assert res["n"] == 40
        assert describe(res).startswith({"ibp": "IBP", "crown_ibp": "CROWN-IBP", "crown": "CROWN",
                                         "alpha_crown": "alpha-CROWN"}[method] + "-verified accuracy")
    assert got["ibp"] <= got["crown"] <= got["alpha_crown"] and got["crown_ibp"] <= got["alpha_crown"], got
    assert got["alpha_crown"] > got["ibp"], got


def test_command_line_eval_alpha_crown(checkpoint, capsys):
    argv = ["eval", "-c", "digits_ibp", "model:name=digits_mlp", "--checkpoint", str(checkpoint), "eval_params:method=alpha_crown",
            "eval_params:epsilon=0.05", "eval_params:num_examples=40", "eval_params:method_params:iteration=5"]
    assert main(argv) == 0
    assert "alpha-CROWN-verified accuracy" in capsys.readouterr().out


def test_alpha_crown_parameters_are_checked_when_the_config_loads():
    cfg = cfg_for("digits_ibp", "eval_params:method=alpha_crown")
    assert cfg["eval_params"]["method_params"] == {"iteration": 20, "lr_alpha": 0.5, "lr_decay": 0.98,
                                                   "early_stop_patience": 10}
    with pytest.raises(ConfigError, match="lr_alpha must be a number > 0"):
        cfg_for("digits_ibp", "eval_params:method=alpha_crown", "eval_params:method_params:lr_alpha=-1")
