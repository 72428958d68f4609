"""The L2 certified-training methods in the app (bcp, lmt, cap): trained by their digits recipes, each verifies
test points at an L2 radius where the standard model verifies none; the eval methods print the three
columns of BCP's README table; configuration mistakes are refused when the config loads."""
import json

import pytest
import torch

from robustkern_cli.config import load_config
from robustkern_cli.errors import ConfigError
from robustkern_cli.evaluate import describe, evaluate
from robustkern_cli.evaluate import fill_all_defaults as _fill_all
from robustkern_cli.main import main
from robustkern_cli.checkpoint import load_checkpoint
from robustkern_cli.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_for(name, *overrides):
    return load_config(name, overrides, fill_defaults=_fill_all)


@pytest.fixture(scope="module")
def standard_mlp(tmp_path_factory):
    """The standard digits model with the recipes' architecture and schedule (digits_mlp, 20 epochs)."""
    run = tmp_path_factory.mktemp("standard")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = cfg_for("digits_standard", "model:name=digits_mlp", "data:batch_size=100", "training_params:epochs=20",
                      "training_params:lr=0.003")
        train(cfg, run, progress=False, log=lambda s: None)
    finally:
        torch.set_num_threads(n)
    return run / "checkpoint.pt"


@pytest.mark.parametrize("method", ["bcp", "lmt", "cap"])
def test_each_method_verifies_digits_where_standard_training_verifies_none(tmp_path, standard_mlp, method):
    cfg = cfg_for(f"digits_{method}")
    eps = cfg["eval_params"]["epsilon"]
    res = train(cfg, tmp_path / method, progress=False, log=lambda s: None)
    assert res.final["eps"] == pytest.approx(eps)
    trained = evaluate(cfg, tmp_path / method / "checkpoint.pt")
    standard = evaluate(cfg, standard_mlp)
    assert standard["verified_acc"] == 0.0 and standard["acc"] > 0.9, standard
    assert 0.1 < trained["verified_acc"] <= trained["pgd_acc"] <= trained["acc"], trained
    assert trained["n"] == standard["n"] == 360
    line = describe(trained)
    assert line.startswith("Standard ") and " | PGD^100 " in line and f"Verification ({method.upper()})" in line


def test_eval_prints_the_table_and_its_json(tmp_path, standard_mlp, capsys):
    out = tmp_path / "res.json"
    assert main(["eval", "-c", "digits_lmt", "--checkpoint", str(standard_mlp), "--threads", "1",
                 "eval_params:num_examples=40", "eval_params:method_params:num_steps=5", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["method"] == "lmt" and res["steps"] == 5 and res["step_size"] == pytest.approx(0.1)
    assert set(res) >= {"acc", "pgd_acc", "verified_acc", "operator_norms"}
    assert main(["eval", "-c", "digits_bcp", "--checkpoint", str(standard_mlp), "--threads", "1",
                 "eval_params:num_examples=40", "eval_params:method_params:num_steps=5"]) == 0
    assert "| Verification (BCP)" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["bcp", "lmt"])
def test_resume_keeps_the_power_iterates(tmp_path, method):
    """The layers' power-iteration iterates travel in the checkpoint: a run resumed after epoch 1 ends with the
    weights of the uninterrupted run (a restarted iterate would give other norm estimates, so other steps)."""
    over = ["training_params:epochs=2", "data:num_train=300"]
    full = train(cfg_for(f"digits_{method}", *over), tmp_path / "full", progress=False, log=lambda s: None)
    assert main(["train", "-q", "-c", f"digits_{method}", "--out", str(tmp_path / "split"), "--threads", "1",
                 "training_params:epochs=1", "data:num_train=300"]) == 0
    first = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    linears = [m for m in full.model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(first["loss_state"]["power_iterates"]) == len(linears) == 3
    assert main(["train", "-q", "--resume", str(tmp_path / "split" / "checkpoint.pt"), "--threads", "1",
                 "training_params:epochs=2"]) == 0
    split = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for k, v in full.model.state_dict().items():
        assert torch.equal(split["model"][k], v), k


@pytest.mark.parametrize("overrides,needle", [
    (["training_params:method=bcp", "training_params:norm=inf"], "certifies L2 balls"),
    (["training_params:method=lmt", "training_params:norm=2", "training_params:method_params:last_layer=all"],
     "last_layer"),
    (["training_params:method=bcp", "training_params:norm=2", "training_params:method_params:power_iterations=0"],
     "power_iterations"),
    (["training_params:method=cap", "training_params:method_params:projections=-1"], "projections"),
    (["eval_params:method=lmt", "eval_params:norm=inf"], "verifies L2 balls"),
    (["eval_params:method=lmt", "eval_params:norm=2", "eval_params:method_params:last_layer=all"], "last_layer"),
])
def test_configuration_mistakes_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        cfg_for("digits_standard", *overrides)


@pytest.mark.parametrize("name", ["bcp_mnist_1.58", "bcp_cifar_4c3f_36_255", "bcp_cifar_6c2f_36_255", "lmt_mnist_1.58",
                                  "lmt_cifar_4c3f_36_255", "lmt_cifar_6c2f_36_255", "cap_mnist_1.58",
                                  "cap_cifar_4c3f_36_255", "cap_cifar_6c2f_36_255"])
def test_the_seed_table_recipes(name):
    """The radii and evaluations of BCP's README table (MNIST eps_2 = 1.58, CIFAR-10 eps_2 = 36/255;
    PGD^100 with step eps/4), one recipe per method and model."""
    cfg = cfg_for(name)
    tp, ep = cfg["training_params"], cfg["eval_params"]
    method = name.split("_")[0]
    eps = 1.58 if "mnist" in name else 36 / 255
    assert tp["method"] == ep["method"] == method
    assert tp["epsilon"] == pytest.approx(eps) and ep["epsilon"] == pytest.approx(eps)
    assert str(tp["norm"]) == str(ep["norm"]) == "2"
    assert ep["method_params"]["num_steps"] == 100 and ep["method_params"]["step_size"] == 0.0
    assert cfg["model"]["name"] == ("mnist_medium" if "mnist" in name else
                                    "cnn_6c2f" if "6c2f" in name else "cifar_medium")
