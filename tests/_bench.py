"""Load a benchmark script (benchmarks/<name>.py) as a module for tests, under a name of its own."""
import importlib.util
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"robustkern_bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
