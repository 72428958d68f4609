"""The floors between the library, the application and the benchmarks: the library never imports the app, the
app imports the library plainly (it is never optional), no benchmark depends on the app, and the product reads
three environment variables (besides the build and kernel switches of setup.py and csrc/)."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "robustkern").rglob("*.py"))
APP = sorted((ROOT / "python" / "robustkern_cli").rglob("*.py"))
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))
CONFIGURATION = {"ROBUSTKERN_BACKEND", "ROBUSTKERN_JIT", "ROBUSTKERN_DATA"}
BUILD_AND_KERNEL_SWITCHES = {"ROBUSTKERN_WITH_CUDA", "ROBUSTKERN_HUGE_PAGES", "ROBUSTKERN_ATTACKS_PORTABLE",
                             "ROBUSTKERN_SMOOTHING_PORTABLE", "ROBUSTKERN_CI_CUDA_BUILD"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("files, what", [(LIBRARY, "the library"), (BENCHMARKS, "a benchmark")])
def test_nothing_below_the_app_imports_it(files, what):
    assert files
    for path in files:
        app = {m for m in imported_modules(path) if m.split(".")[0] == "robustkern_cli"}
        assert not app, f"{what} ({path.relative_to(ROOT)}) imports the application: {sorted(app)}"


def test_the_app_imports_the_library_plainly():
    """No import by name (importlib, find_spec): a missing library part is an installation error, not a state the
    app handles."""
    for path in APP:
        text = path.read_text()
        assert not re.search(r"(import_module|find_spec)\(\s*[\"']robustkern", text), path.relative_to(ROOT)


def test_the_product_reads_three_environment_variables():
    files = LIBRARY + APP + BENCHMARKS + sorted((ROOT / "benchmarks").glob("*.sh")) + [ROOT / "setup.py"]
    found = {name: path for path in files for name in re.findall(r"\bROBUSTKERN_[A-Z_]+\b", path.read_text())}
    extra = {n: str(p.relative_to(ROOT)) for n, p in found.items() if n not in CONFIGURATION | BUILD_AND_KERNEL_SWITCHES}
    assert not extra, f"environment variables beyond {sorted(CONFIGURATION)}: {extra} (make them arguments)"
