"""The floors of the house, read from the source: kernels -> ops -> algorithms -> application, with no import
running back up, and the op floor as the only way from an algorithm to a kernel (robustkern/ops/README.md)."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "robustkern"
ALGORITHMS = ("bounds", "smoothing", "flatness", "attacks", "compat")


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by ``path`` (relative imports resolved inside ``robustkern``)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def _files(*parts: str):
    base = LIB.joinpath(*parts)
    return sorted(base.rglob("*.py")) if base.is_dir() else [base]


def _offenders(files, forbidden) -> list[str]:
    bad = []
    for f in files:
        for name in _imports(f):
            if any(name == p or name.startswith(p + ".") for p in forbidden):
                bad.append(f"{f.relative_to(ROOT)} imports {name}")
    return bad


def test_kernels_import_no_floor_above_them():
    assert _offenders(_files("kernels"), ["robustkern.ops", "robustkern.reference", "robustkern_cli"]
                      + [f"robustkern.{a}" for a in ALGORITHMS]) == []


def test_references_import_no_floor_above_them():
    assert _offenders(_files("reference"), ["robustkern.ops", "robustkern.kernels", "robustkern_cli"]
                      + [f"robustkern.{a}" for a in ALGORITHMS]) == []


def test_ops_import_no_algorithm():
    assert _offenders(_files("ops"), ["robustkern_cli"] + [f"robustkern.{a}" for a in ALGORITHMS]) == []


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithms_reach_kernels_only_through_the_op_floor(algorithm):
    files = _files(algorithm)
    assert _offenders(files, ["robustkern._backend", "robustkern._ext", "robustkern.kernels", "robustkern._C",
                              "robustkern_cli"]) == []
    raw = [f"{f.relative_to(ROOT)}" for f in files if "torch.ops.robustkern" in f.read_text()]
    assert raw == [], "algorithms call robustkern's ops through robustkern.ops, not torch.ops.robustkern"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithms_use_no_test_oracle(algorithm):
    """The references are the ops' ground truth (the op table runs them) and the tests' oracles; an algorithm
    reaches them only through the ops. The one exception: MACER's ``faithful=True`` mode, which exists to
    reproduce the original's numbers with its arithmetic (``reference.published.macer``)."""
    allowed = {"robustkern/smoothing/macer.py": {"robustkern.reference.published.macer"}}
    bad = [line for line in _offenders(_files(algorithm), ["robustkern.reference"])
           if not any(line.startswith(f) and line.split(" imports ")[1].startswith(tuple(a))
                      for f, a in allowed.items())]
    assert bad == []


def test_the_library_never_imports_the_application():
    assert _offenders(sorted(LIB.rglob("*.py")), ["robustkern_cli"]) == []


def test_backend_selection_has_one_caller():
    """Only the op table chooses backends (``_backend.select``)."""
    callers = [f.relative_to(ROOT) for f in LIB.rglob("*.py")
               if re.search(r"_backend\.select\(|import[^\n]*\bselect\b", f.read_text())
               and f.name not in ("_backend.py", "_registry.py", "_info.py")]
    assert callers == []
