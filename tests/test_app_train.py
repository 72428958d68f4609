"""robustkern_cli.train: standard training learns, resume is exact, the epsilon schedules, IBP training."""
import csv
import math

import pytest
import torch

from robustkern_cli.checkpoint import load_checkpoint
from robustkern_cli.config import load_config
from robustkern_cli.data import load_dataset, make_loader
from robustkern_cli.errors import ConfigError
from robustkern_cli.evaluate import clean_metrics, evaluate, model_from_config
from robustkern_cli.losses import LOSSES, NOT_IMPLEMENTED, scheduled_epsilon, training_loss
from robustkern_cli.evaluate import fill_all_defaults as _fill_all
from robustkern_cli.main import main
from robustkern_cli.train import train


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_for(name, *overrides):
    return load_config(name, overrides, fill_defaults=_fill_all)


def test_one_epoch_of_standard_training_reduces_the_loss(tmp_path):
    cfg = cfg_for("digits_standard", "training_params:epochs=1")
    torch.manual_seed(cfg["seed"])
    untrained = model_from_config(cfg)
    test_loader = make_loader(load_dataset("digits", "test"), 360)
    before = clean_metrics(untrained, test_loader)
    res = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    after = res.final
    assert after["test_loss"] < before["loss"] - 0.2, (before, after)
    assert after["test_acc"] > before["acc"] + 0.2
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert {"model", "optimizer", "lr_scheduler", "config", "epoch", "metrics", "rng"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["config"]["name"] == "digits_standard"
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").read_text().splitlines()))
    assert len(rows) == 1 and float(rows[0]["train_loss"]) == pytest.approx(after["train_loss"])
    assert (tmp_path / "run" / "config.json").is_file()


RESUME_OVERRIDES = (  # exercises every piece of state: SGD momentum, an LR milestone, the loader's shuffling,
    "training_params:method=gaussian",  # the global RNG (noise, flips) and the method's parameters
    "training_params:optimizer=sgd", "training_params:lr=0.05", "training_params:lr_schedule=multistep",
    "training_params:lr_milestones=[1]", "data:augment=flip", "data:batch_size=128",
)


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path):
    cfg = cfg_for("digits_standard", "training_params:epochs=2", *RESUME_OVERRIDES)
    full = train(cfg, tmp_path / "full", progress=False, log=lambda s: None)

    overrides = ["-q", "--out", str(tmp_path / "split"), "training_params:epochs=1", *RESUME_OVERRIDES]
    assert main(["train", "-c", "digits_standard", *overrides]) == 0
    assert main(["train", "-q", "--resume", str(tmp_path / "split" / "checkpoint.pt"),
                 "training_params:epochs=2"]) == 0
    split = load_checkpoint(tmp_path / "split" / "checkpoint.pt")

    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(split["metrics"]) == strip(full.history)
    assert split["metrics"][1]["lr"] == pytest.approx(0.005)  # the milestone survived the resume
    for k, v in full.model.state_dict().items():
        assert torch.equal(split["model"][k], v), k
    full_ckpt = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert split["lr_scheduler"] == full_ckpt["lr_scheduler"]  # ready to continue identically too
    assert split["optimizer"]["param_groups"] == full_ckpt["optimizer"]["param_groups"]
    for k, v in full_ckpt["optimizer"]["state"].items():
        assert torch.equal(split["optimizer"]["state"][k]["momentum_buffer"], v["momentum_buffer"])
    rows = list(csv.DictReader((tmp_path / "split" / "log.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def test_a_different_seed_gives_a_different_run(tmp_path):
    a = train(cfg_for("digits_standard", "training_params:epochs=1", "seed=1"), tmp_path / "a", progress=False,
              log=lambda s: None)
    b = train(cfg_for("digits_standard", "training_params:epochs=1", "seed=2"), tmp_path / "b", progress=False,
              log=lambda s: None)
    assert a.final["train_loss"] != b.final["train_loss"]


def crown_ibp_eps(t, schedule_type, start, length, init, final, steps_per_epoch, mid=0.25, beta=4.0):
    """CROWN-IBP's EpsilonScheduler.get_eps at global step t (huanzhang12/CROWN-IBP eps_scheduler.py and
    train.py's init_step/final_step, DeepMind's linear_schedule/smooth_schedule), written out for the test."""
    t0, t1 = start * steps_per_epoch, (start + length - 1) * steps_per_epoch

    def linear(t, a, b, va, vb):
        if a == b:
            return vb
        return min(max(va + (t - a) / (b - a) * (vb - va), min(va, vb)), max(va, vb))
    if schedule_type == "linear":
        return linear(t, t0, t1, init, final)
    m = int((t1 - t0) * mid) + t0
    if m <= t0:
        a = 1.0
    else:
        a = (final - init) / ((t1 - m) * beta * (m - t0) ** (beta - 1) + (m - t0) * (m - t0) ** (beta - 1))
    if t <= t0:
        return init
    if t < m:
        return init + a * (t - t0) ** beta
    return linear(t, m, t1, a * (m - t0) ** beta + init, final)


def schedule(kind, start, length, init, final):
    return {"schedule_type": kind, "schedule_start": start, "schedule_length": length, "starting_epsilon": init,
            "epsilon": final}


@pytest.mark.parametrize("kind", ["linear", "smoothed"])
@pytest.mark.parametrize("start, length, init, final, spe", [
    (2, 3, 0.0, 1.0, 10), (0, 1, 0.0, 0.3, 7), (1, 1, 0.1, 0.4, 5), (3, 11, 0.05, 0.4, 13), (0, 2, 0.0, 0.2, 1)])
def test_epsilon_schedule_is_crown_ibps(kind, start, length, init, final, spe):
    """The app's ramp (robustkern.bounds.linear_eps / smoothed_eps with CROWN-IBP's step mapping) gives
    CROWN-IBP's epsilon at every step, starting_epsilon included, for ramps of any length."""
    tp = schedule(kind, start, length, init, final)
    for t in range((start + length + 2) * spe):
        got = scheduled_epsilon(tp, t // spe, t % spe, spe)
        assert got == pytest.approx(crown_ibp_eps(t, kind, start, length, init, final, spe), rel=1e-12, abs=1e-15)


def test_epsilon_schedule_values():
    lin, sm = schedule("linear", 2, 3, 0.0, 1.0), schedule("smoothed", 2, 3, 0.0, 1.0)  # steps 20 .. 40
    assert [scheduled_epsilon(lin, e, s, 10) for e, s in ((1, 5), (2, 0), (3, 0), (4, 0), (9, 3))] == \
        [0.0, 0.0, 0.5, 1.0, 1.0]
    values = [scheduled_epsilon(sm, 0, t, 10) for t in range(50)]
    assert values[20] == 0.0 and values[40] == pytest.approx(1.0) and values[49] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(values, values[1:]))
    # DeepMind's smooth schedule: alpha = 1 / ((40-25)*4*5**3 + 5*5**3) = 1/8125, eps(t) = alpha*(t-20)**4 to 25
    assert values[23] == pytest.approx(3 ** 4 / 8125)
    assert values[25] == pytest.approx(5 ** 4 / 8125)  # continuous into the linear part
    assert values[23] < scheduled_epsilon(lin, 0, 23, 10)
    iat = schedule("linear_epoch", 0, 40, 0.0, 0.4)  # Shaeiri et al.'s IAT: 0.01 per epoch
    assert [scheduled_epsilon(iat, e, 3, 7) for e in (0, 1, 39, 45)] == pytest.approx([0.01, 0.02, 0.4, 0.4])


def test_the_iat_recipe_trains_at_the_scheduled_radius(tmp_path):
    """iat_mnist_0.4: PGD-AT at eps_t = 0.01 (t + 1) with int(2.5 eps_t / 0.01) steps (Shaeiri et al.), not at
    the final 0.4 from the first epoch."""
    cfg = cfg_for("iat_mnist_0.4", "data:dataset=digits", "training_params:epochs=2",
                  "data:num_train=32", "data:batch_size=16", "training_params:eval_every=0")
    res = train(cfg, tmp_path / "iat", progress=False, log=lambda s: None)
    assert [row["eps"] for row in res.history] == pytest.approx([0.01, 0.02])
    assert [row["train_steps"] for row in res.history] == [2, 5]


def test_methods_and_unknown_methods():
    assert training_loss("crown_ibp_ours") is LOSSES["crown_ibp_ours"]
    assert training_loss("lfr") is LOSSES["lfr"]
    with pytest.raises(ConfigError, match="unknown training method 'sgd'"):
        cfg_for("digits_standard", "training_params:method=sgd")
    with pytest.raises(ConfigError, match="use method 'ibp' for pure IBP"):
        cfg_for("digits_ibp", "training_params:method=crown_ibp", "training_params:method_params:bound_type=interval")
    with pytest.raises(ConfigError, match="method_params:epsilon to the same value"):
        cfg_for("pgd_at_mnist_0.3", "training_params:epsilon=0.3", "training_params:method_params:epsilon=0.1")


def test_ibp_training_and_verified_evaluation(tmp_path):
    cfg = cfg_for("digits_ibp", "training_params:epochs=3", "training_params:schedule_start=0",
                  "training_params:schedule_length=2", "training_params:epsilon=0.02", "eval_params:epsilon=0.02")
    res = train(cfg, tmp_path / "ibp", progress=False, log=lambda s: None)
    last = res.final
    for key in ("train_robust_ce", "train_natural_ce", "train_verified_acc", "train_kappa"):
        assert math.isfinite(last[key])
    assert last["eps"] == pytest.approx(0.02)
    assert last["train_kappa"] == pytest.approx(0.5)  # final_kappa once eps has reached epsilon
    assert last["train_robust_ce"] >= last["train_natural_ce"] - 1e-6  # a bound is never better than the point
    ev = evaluate(cfg, tmp_path / "ibp" / "checkpoint.pt")
    assert ev["n"] == 360 and 0.3 < ev["verified_acc"] <= ev["acc"]
    ev0 = evaluate(cfg_for("digits_ibp", "eval_params:epsilon=0.0"), tmp_path / "ibp" / "checkpoint.pt")
    assert ev0["verified_acc"] > ev["verified_acc"]


def test_crown_ibp_training(tmp_path):
    argv = ["train", "-q", "-c", "digits_ibp", "--out", str(tmp_path), "training_params:method=crown_ibp",
            "training_params:method_params:bound_type=crown-interval", "training_params:epochs=1"]
    assert main(argv) == 0
    assert load_checkpoint(tmp_path / "checkpoint.pt")["metrics"][0]["train_beta"] > 0


@pytest.mark.parametrize("method,params", [
    ("pgd", ["training_params:method_params:epsilon=0.1", "training_params:method_params:step_size=0.05",
             "training_params:method_params:num_steps=3"]),
    ("trades", ["training_params:method_params:epsilon=0.1", "training_params:method_params:step_size=0.05",
                "training_params:method_params:num_steps=3", "training_params:method_params:beta=1.0"]),
])
def test_adversarial_training_methods_train(tmp_path, method, params):
    """PGD-AT and TRADES run through the library's losses: two epochs on digits lower the training loss."""
    cfg = cfg_for("digits_standard", f"training_params:method={method}", "training_params:epochs=2", *params)
    res = train(cfg, tmp_path / method, progress=False, log=lambda s: None)
    first, last = res.history[0]["train_loss"], res.history[-1]["train_loss"]
    assert math.isfinite(last) and last < first


# One epoch of every available method (issue #3's check), with each method's inner loops shortened.
_FAST = {
    "standard": [],
    "gaussian": ["training_params:method_params:sigma=0.25"],
    "ibp": ["training_params:epsilon=0.001", "training_params:schedule_length=1"],
    "crown_ibp": ["training_params:epsilon=0.001", "training_params:schedule_length=1"],
    "crown_ibp_ours": ["training_params:epsilon=0.001", "training_params:schedule_length=1"],
    "pgd": ["training_params:method_params:epsilon=0.1", "training_params:method_params:step_size=0.05",
            "training_params:method_params:num_steps=2"],
    "trades": ["training_params:method_params:epsilon=0.1", "training_params:method_params:step_size=0.05",
               "training_params:method_params:num_steps=2"],
    "macer": ["training_params:method_params:gauss_num=2", "training_params:method_params:lbd=1.0"],
    "smoothadv": ["training_params:method_params:num_steps=2"],
    "trades_rs": ["training_params:method_params:num_steps=2"],
    "consistency": [],
    "lfr": ["training_params:method_params:epsilon=0.1", "training_params:method_params:num_steps=2"],
    "grad_norm": [],
    "bcp": ["training_params:norm=2", "training_params:epsilon=0.1", "training_params:schedule_length=1"],
    "lmt": ["training_params:norm=2", "training_params:epsilon=0.1", "training_params:schedule_length=1"],
    "cap": ["training_params:norm=2", "training_params:epsilon=0.1", "training_params:schedule_length=1",
            "training_params:method_params:projections=5"],
}


def _available_methods():
    return sorted(m for m in LOSSES if m not in NOT_IMPLEMENTED)


def test_every_available_method_has_a_one_epoch_test():
    assert set(_available_methods()) == set(_FAST)


@pytest.mark.parametrize("method", sorted(_FAST))
def test_one_epoch_of_each_method_on_digits(tmp_path, method):
    """Each method trains one epoch (22 steps) on digits through the loop: finite metrics, a checkpoint, weights
    that moved, and a model better than chance."""
    cfg = cfg_for("digits_standard", f"training_params:method={method}", "training_params:epochs=1",
                  "training_params:lr=0.005", *_FAST[method])
    torch.manual_seed(cfg["seed"])
    init = model_from_config(cfg).state_dict()
    res = train(cfg, tmp_path / method, progress=False, log=lambda s: None)
    assert len(res.history) == 1 and all(math.isfinite(v) for v in res.history[0].values()
                                         if isinstance(v, float)), res.history
    ckpt = load_checkpoint(tmp_path / method / "checkpoint.pt")
    assert ckpt["epoch"] == 1
    moved = [not torch.equal(init[k], v) for k, v in ckpt["model"].items() if v.is_floating_point()]
    assert all(moved)
    assert res.final["test_acc"] > 0.3, res.final



_P = "training_params:method_params:"


@pytest.mark.parametrize("method,params,radii", [
    ("trades", [_P + "epsilon=0.1", _P + "step_size=0.05", _P + "num_steps=2"], [0.1]),
    ("pgd", [_P + "epsilon=0.1", _P + "step_size=0.05", _P + "num_steps=2"], [0.1]),
    ("lfr", [_P + "epsilon=0.1", _P + "num_steps=2"], [0.1]),
    ("trades_rs", [_P + "epsilon=0.3", _P + "num_steps=2"], [0.3]),
    # SmoothAdv: epsilon 0.5 (L2, [0, 1] pixels) warmed up over 4 epochs: 0.125 in epoch 1, 0.25 in epoch 2
    ("smoothadv", [_P + "epsilon=0.5", _P + "warmup=4", _P + "num_steps=2"], [0.125, 0.25]),
    ("gaussian", [], None),  # no radius: nothing logged, not a misleading 0
])
def test_logged_eps_is_the_radius_the_method_uses(tmp_path, method, params, radii):
    """The ``eps`` of log.csv, of the log line and of TensorBoard's train/eps is the method's own radius (it was
    the certified-training schedule's epsilon, 0 here, for every method); a method without one logs none."""
    import csv as _csv

    from robustkern_cli import scalar_log as tb

    epochs = len(radii) if radii else 1
    cfg = cfg_for("digits_standard", f"training_params:method={method}", f"training_params:epochs={epochs}",
                  "data:num_train=64", "data:batch_size=32", "training_params:eval_every=0", *params)
    lines = []
    res = train(cfg, tmp_path / "run", tensorboard=tmp_path / "tb", progress=False, log=lines.append)
    rows = list(_csv.DictReader((tmp_path / "run" / "log.csv").read_text().splitlines()))
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    steps = tb.read_scalars(tmp_path / "tb")
    assert len(rows) == len(epoch_lines) == epochs and [s for s, _ in steps["train/loss"]] == list(range(2 * epochs))
    if radii is None:
        assert all("eps" not in row for row in res.history) and "eps" not in rows[0]
        assert "train/eps" not in steps and "epoch/eps" not in steps
        assert not any(", eps=" in line for line in epoch_lines)
        return
    assert [row["eps"] for row in res.history] == pytest.approx(radii)
    assert [float(row["eps"]) for row in rows] == pytest.approx(radii)
    assert [v for _, v in steps["train/eps"]] == pytest.approx([r for r in radii for _ in range(2)])
    assert [v for _, v in steps["epoch/eps"]] == pytest.approx(radii)
    for line, r in zip(epoch_lines, radii):
        assert f", eps={r:.4g}," in line, line
    assert not any(key == "train_eps" for key in res.final)


def test_grad_norm_loss_is_ce_plus_squared_input_gradient_norm():
    """The app's grad_norm method: CE + lam * mean ||grad_x CE_i||_2^2, against torch's own double backprop."""
    from robustkern_cli.losses import StepState

    cfg = cfg_for("digits_standard", "training_params:method=grad_norm", "training_params:method_params:lam=0.7")
    torch.manual_seed(0)
    model = model_from_config(cfg).double()
    x, y = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.arange(6)
    loss, metrics = LOSSES["grad_norm"](model, x, y, cfg, StepState())
    xr = x.clone().requires_grad_(True)
    logits = model(xr)
    g, = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y, reduction="sum"), xr, create_graph=True)
    ref = torch.nn.functional.cross_entropy(logits, y) + 0.7 * g.flatten(1).norm(dim=1).pow(2).mean()
    torch.testing.assert_close(loss, ref)
    ours = torch.autograd.grad(loss, list(model.parameters()))
    theirs = torch.autograd.grad(ref, list(model.parameters()))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match="power"):
        cfg_for("digits_standard", "training_params:method=grad_norm", "training_params:method_params:power=3")
