"""README.md and the command's help stay true: the Python blocks run, every command line (README and help
examples) parses with its recipe and overrides, the install lines name extras that exist, the test set-up is
the one CI uses, and the help never says that a method which runs here is unavailable."""
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import torch

from robustkern.models import build_model
from robustkern_cli.config import list_configs, load_config
from robustkern_cli.evaluate import fill_all_defaults as _fill_all
from robustkern_cli.losses import LOSSES, NOT_IMPLEMENTED
from robustkern_cli.main import ENVIRONMENT, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, re.S)
SUBCOMMANDS = ("train", "eval", "certify", "analyze", "bench", "demo", "info")

pytestmark = pytest.mark.usefixtures("one_thread")


def _help(cmd: str) -> str:
    for action in build_parser()._subparsers._group_actions:
        if cmd in action.choices:
            return action.choices[cmd].format_help()
    raise KeyError(cmd)


def _command_lines() -> list[tuple[str, str]]:
    """``(where, line)`` of every robustkern command line in README's shell blocks and in the help examples."""
    lines = [("README", line) for lang, body in BLOCKS if lang == "bash" for line in body.splitlines()]
    for cmd in SUBCOMMANDS:
        text = _help(cmd)
        if "example" in text:
            section = text.split("example", 1)[1].split("\n\n")[0]
            lines += [(f"{cmd} --help", line) for line in section.splitlines()[1:]]
    out = []
    for where, line in lines:
        words = shlex.split(line, comments=True)
        for i, w in enumerate(words):
            if w in ("robustkern", "robustkern_cli", "robustkern_cli.main") and i + 1 < len(words) \
                    and words[i + 1] in SUBCOMMANDS:
                out.append((where, shlex.join(words[i + 1:])))
                break
    return out


COMMANDS = _command_lines()


def test_every_command_line_is_found():
    subcommands = {shlex.split(c)[0] for _, c in COMMANDS}
    assert subcommands == set(SUBCOMMANDS)
    assert len([c for w, c in COMMANDS if w == "README"]) >= 8


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}: {c}" for w, c in COMMANDS])
def test_command_lines_parse_with_their_recipe_and_overrides(where, command, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = build_parser().parse_args(shlex.split(command))  # SystemExit: an option that does not exist
    assert main([args.command, "--help"]) == 0
    if getattr(args, "overrides", None) is not None:
        overrides = list(args.overrides)
        if getattr(args, "resume", None) not in (None, "auto") and "=" in args.resume:
            overrides.insert(0, args.resume)
        load_config(args.config, overrides, fill_defaults=_fill_all)  # ConfigError: a wrong key or value


def test_python_blocks_run(tmp_path, monkeypatch):
    """The README's Python blocks, in order in one namespace, given the objects the text says they take."""
    monkeypatch.chdir(tmp_path)
    from robustkern_cli.data import load_dataset
    torch.manual_seed(0)
    x, y = (t[:16] for t in load_dataset("digits", "test").tensors)
    model = build_model("digits_cnn").eval()
    namespace = {"model": model, "example_batch": x[:1], "loader": [(x, y)], "num_classes": 10, "eps": 0.05,
                 "kappa": 0.5, "opt": torch.optim.SGD(model.parameters(), lr=0.01), "x": x, "y": y,
                 "step": 0}  # the training step a seed is drawn for
    blocks = [body for lang, body in BLOCKS if lang == "python"]
    assert len(blocks) >= 3
    for body in blocks:
        exec(compile(body, "README.md", "exec"), namespace)  # noqa: S102 - our own README


def test_info_runs(capsys):
    assert "robustkern info" in README
    assert main(["info"]) == 0
    assert "training methods:" in capsys.readouterr().out


def test_install_extras_exist():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = [e.strip() for group in re.findall(r"\.\[([\w,\s-]+)\]", README) for e in group.split(",")]
    assert {"data", "plots"} <= set(named)
    assert set(named) <= set(extras), set(named) - set(extras)
    from robustkern_cli.errors import install_hint
    for package, extra in (("scikit-learn", "data"), ("matplotlib", "plots")):
        assert f".[{extra}]" in install_hint(package) and package in extras[extra]


def test_the_test_setup_is_the_one_ci_uses():
    ci = (ROOT / ".ci" / "run").read_text()

    def packages(text):
        words = set()
        for cmd in re.findall(r"pip install ((?:[^\n\\]|\\\n)*)", text):
            words |= {w for w in cmd.replace("\\\n", " ").split() if not w.startswith("-") and w != "."}
        return words

    tests_block = next(body for lang, body in BLOCKS if lang == "bash" and "pytest" in body)
    assert packages(tests_block) == packages(ci)

    def pytest_line(text):
        (line,) = [line.split("#")[0].strip() for line in text.splitlines() if "-m pytest" in line]
        return line
    assert pytest_line(tests_block) == pytest_line(ci)
    assert not re.findall(r"^export (\w+)=", ci, re.M)   # nothing set behind the README's back


def test_recipes_that_exit_4_are_named():
    """A recipe whose method is not implemented is named in the README; one whose method is, is not said to
    exit 4 (the llm_* recipes run since crown_ibp_ours exists)."""
    methods = {recipe: load_config(recipe, fill_defaults=_fill_all)["training_params"]["method"]
               for recipe in list_configs()}
    unavailable = [recipe for recipe, method in methods.items() if method in NOT_IMPLEMENTED]
    said = " ".join(_clauses_saying_exit_4(README))
    for recipe, method in methods.items():
        if recipe not in unavailable:
            assert method not in said and recipe not in said, (recipe, said)
    for recipe in unavailable:
        prefix = recipe.split("_")[0] + "_"
        assert recipe in README or f"{prefix}*" in README, recipe


def _clauses_saying_exit_4(text: str) -> list[str]:
    flat = " ".join(text.split())
    return [c for c in re.split(r"[;.]\s", flat) if "exit 4" in c or "exits 4" in c]


@pytest.mark.parametrize("cmd", ["train", "eval"])
def test_help_names_every_method(cmd):
    from robustkern_cli.evaluate import EVALS
    flat = " ".join(_help(cmd).split())
    for m in EVALS if cmd == "eval" else LOSSES:
        assert re.search(rf"\b{m}\b", flat), m


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_never_calls_a_method_that_runs_unavailable(cmd):
    from robustkern_cli.evaluate import EVALS
    runs = list(EVALS) + [m for m in LOSSES if m not in NOT_IMPLEMENTED]  # tests/test_app_cli.py, test_app_train.py
    for clause in _clauses_saying_exit_4(_help(cmd)):
        named = [m for m in runs if re.search(rf"\b{m}\b", clause)]
        assert not named, (clause, named)


def test_demo_time_is_stated_alike():
    pattern = r"(\d+(?:-\d+)?) s on 2 CPU cores"
    stated_readme = re.findall(pattern, README)
    stated_help = re.findall(pattern, " ".join(_help("demo").split()))
    assert stated_readme and stated_help and set(stated_readme) == set(stated_help)


def test_the_environment_variables_are_the_ones_documented():
    """README's table names exactly the variables the command reports (robustkern info)."""
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"^\| `(ROBUSTKERN_\w+)`", section, re.M)) == set(ENVIRONMENT)


def test_versions_agree():
    """The package's version, the app's and pyproject.toml's are one number."""
    import robustkern
    import robustkern_cli
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert robustkern.__version__ == robustkern_cli.__version__ == project
