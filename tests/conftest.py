import os

import pytest
import torch

# Triton kernels run on the CPU only under the interpreter, which must be on before they are defined. Only this
# file sets TRITON_INTERPRET, and only without CUDA, so that a GPU run tests the compiled kernels
# (tests/test_suite_devices.py checks both, against the value found at start-up).
TRITON_INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")
    parser.addoption("--property-examples", type=int, default=60,
                     help="examples of the soundness property test (tests/test_soundness_property.py)")
    parser.addoption("--property-seed", type=int, default=0, help="first seed of the soundness property test")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: longer than a few seconds on 2 CPU cores")
    config.addinivalue_line("markers", "triton: runs Triton kernels (interpreted on CPU: tiny shapes)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    run_slow = config.getoption("--run-slow")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


@pytest.fixture
def property_examples(request) -> int:
    return request.config.getoption("--property-examples")


@pytest.fixture
def property_seed(request) -> int:
    return request.config.getoption("--property-seed")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for tiny models: avoids OpenMP barrier stalls when the 2 cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
