"""A trained run shared by the command-line tests: one epoch of digits_gaussian on 64 images (a few seconds)."""
import pytest
import torch

from robustkern_cli.main import main

QUICK = ["training_params:epochs=1", "data:num_train=64", "data:num_test=32"]


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory):
    """The run folder of a one-epoch digits_gaussian run (checkpoint.pt, log.csv, config.json)."""
    run = tmp_path_factory.mktemp("gaussian") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "-q", "-c", "digits_gaussian", "--out", str(run), *QUICK]) == 0
    finally:
        torch.set_num_threads(threads)
    return run
