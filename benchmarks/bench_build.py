"""How long installing robustkern takes, as a user would run it: the ahead-of-time build of robustkern._C with
pip, a re-install, and the JIT build on first use.

    python benchmarks/bench_build.py [--baseline REV] [--steps install,jit] [--touch csrc/cpu/crown_cpu.cpp]
                                     [--write-results]

Each source tree (the work tree, tracked and untracked files; with ``--baseline`` also the git revision REV)
is copied into a temporary folder and installed there into its own virtual environment, which sees this
Python's packages (``--system-site-packages``: pip, setuptools, torch, ninja) but keeps the install to itself.
Steps, each one command run in the copy:

1. ``clean install``: ``pip install --no-build-isolation -e .`` in the fresh copy;
2. ``re-install``: the same command again, nothing changed (what a second set-up line costs);
3. ``re-install, one .cpp touched``: the same after ``touch``-ing one source (``--touch``);
4. ``JIT first use``: ``robustkern._ext.load()`` in a new process that cannot import robustkern._C, with an
   empty cache (``XDG_CACHE_HOME``): the build a plain ``pip install -e .`` leaves for the first use;
5. ``JIT, next process``: the same call again, the library cached.

``--steps install`` runs steps 1-3 only, ``--steps jit`` steps 4-5 only. Each step is timed by the wall clock
and by the CPU time of the command and every process it waited for (pip, ninja, the compilers); the machine's
1-minute load average before the step is recorded beside them, as the wall time of a build on shared CPUs
depends on it. ``MAX_JOBS`` is left as the user has it (unset: ninja runs CPUs + 2 jobs). ``--write-results``
writes the table into ``RESULTS.md`` (block "build") and appends the rows to ``results/build.csv``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BENCH = "build"
ROOT = common.BENCH_DIR.parent
INSTALL = ["-m", "pip", "install", "--no-build-isolation", "-e", "."]
JIT_LOAD = ("import sys, time\n"
            "sys.modules['robustkern._C'] = None  # as if robustkern._C were not built\n"
            "from robustkern import _ext\n"
            "t = time.perf_counter()\n"
            "assert _ext.load(), _ext.status()\n"
            "print(f'load() {time.perf_counter() - t:.1f} s, {_ext.status()}')\n")
INSTALL_STEPS = ("clean install", "re-install", "re-install, one .cpp touched")
JIT_STEPS = ("JIT first use", "JIT, next process")


@dataclasses.dataclass
class Step:
    name: str
    command: str
    seconds: float
    cpu_seconds: float
    load1: float
    note: str = ""


def _copy_tree(rev: str | None, dest: Path) -> str:
    """The work tree (rev None: tracked and untracked, not ignored; without git, all but the build outputs) or
    the revision ``rev`` into ``dest``;
    returns a label (the revision's short hash; the work tree's commit, ``+dirty`` when it differs)."""
    git = ["git", "-C", str(ROOT)]
    if rev is not None:
        archive = subprocess.run(git + ["archive", rev], capture_output=True, check=True).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(dest, filter="data")
        return subprocess.run(git + ["rev-parse", "--short", rev], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        files = subprocess.run(git + ["ls-files", "-co", "--exclude-standard", "-z"], capture_output=True,
                               text=True, check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):  # a copy of the tree without git: all but build outputs
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", "build", "*.so", "*.egg-info", "__pycache__", ".pytest_cache"))
        return common.git_commit()
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return common.git_commit()


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, float, str]:
    """Run ``cmd``; (wall seconds, CPU seconds of it and everything it waited for (pip, ninja, the compilers),
    its output). Raises with the output's tail when it fails."""
    t, cpu = time.perf_counter(), _children_cpu_seconds()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - t, _children_cpu_seconds() - cpu
    output = proc.stdout + proc.stderr
    log.write_text(output)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}) in {cwd}:\n{output[-3000:]}")
    return seconds, cpu, output


def measure(rev: str | None, touch: str, keep: bool, install: bool = True, jit: bool = True
            ) -> tuple[str, list[Step]]:
    """The install steps and/or the JIT steps for one source tree; (its label, the steps)."""
    work = Path(tempfile.mkdtemp(prefix="robustkern-bench-build-"))
    try:
        src, venv, cache = work / "src", work / "venv", work / "cache"
        src.mkdir()
        label = _copy_tree(rev, src)
        print(f"{label}: copied into {src}", flush=True)
        # No pip of its own: this Python's pip, setuptools and ninja serve, as in the user's environment.
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                       check=True)
        python = str(venv / "bin" / "python")
        env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
        env.pop("PYTHONPATH", None)
        steps = []

        def step(name, cmd, command, run_env=env, note_from=None):
            load1 = os.getloadavg()[0]
            seconds, cpu, output = _run(cmd, src, run_env, work / f"{len(steps)}.log")
            note = note_from(output) if note_from else ""
            steps.append(Step(name, command, seconds, cpu, load1, note))
            print(f"{label}: {name}: {seconds:.1f} s, CPU {cpu:.1f} s (load {load1:.2f}) {note}", flush=True)

        if install:
            command = "pip install --no-build-isolation -e ."
            step(INSTALL_STEPS[0], [python] + INSTALL, command)
            step(INSTALL_STEPS[1], [python] + INSTALL, command)
            os.utime(src / touch)
            step(INSTALL_STEPS[2], [python] + INSTALL, f"touch {touch}; {command}")
        if jit:
            jit_env = {**env, "XDG_CACHE_HOME": str(cache), "ROBUSTKERN_JIT": "1"}
            load = "python -c 'from robustkern import _ext; _ext.load()'"
            for name in JIT_STEPS:
                step(name, [python, "-c", JIT_LOAD], load, jit_env, _jit_note)
        return label, steps
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _jit_note(output: str) -> str:
    """The time of the load() call itself, and what the process says on stderr (lines ``robustkern: ...``)."""
    timed = [ln for ln in output.splitlines() if ln.startswith("load() ")]
    said = [ln for ln in output.splitlines() if ln.startswith("robustkern:")]
    return "; ".join(timed + ([f"prints \"{ln}\"" for ln in said] or ["prints nothing"]))


def table(runs: list[tuple[str, list[Step]]]) -> str:
    head = "| step | command | " + " | ".join(f"`{label}`: wall s, CPU s (load)" for label, _ in runs) + " |"
    rows = [head, "|" + "---|" * (2 + len(runs))]
    for i, last in enumerate(runs[-1][1]):
        cells = [f"{steps[i].seconds:.1f}, {steps[i].cpu_seconds:.1f} ({steps[i].load1:.2f})" for _, steps in runs]
        rows.append(f"| {last.name} | `{last.command}` | " + " | ".join(cells) + " |")
    notes = [f"- `{label}`, {s.name}: {s.note}" for label, steps in runs for s in steps if s.note]
    return "\n".join(rows + [""] + notes)


def append_csv(runs, env: common.Environment) -> Path:
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = common.RESULTS_DIR / f"{BENCH}.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["bench", "device", "tree", "step", "seconds", "cpu_seconds", "load1", "command", "commit",
                        "date"])
        for label, steps in runs:
            for s in steps:
                w.writerow([BENCH, env.device, label, s.name, round(s.seconds, 2), round(s.cpu_seconds, 2),
                            round(s.load1, 2), s.command, env.commit, env.date])
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="REV", help="also measure this git revision (the 'before')")
    parser.add_argument("--steps", default="install,jit", help="install (steps 1-3), jit (steps 4-5) or both")
    parser.add_argument("--touch", default="csrc/cpu/crown_cpu.cpp", help="the source touched in step 3")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies (their logs: N.log)")
    parser.add_argument("--write-results", action="store_true", help="write RESULTS.md and results/build.csv")
    common.add_output_options(parser)
    args = parser.parse_args(argv)
    steps = set(args.steps.split(","))
    if not steps or steps - {"install", "jit"}:
        parser.error(f"--steps takes install, jit or install,jit, got {args.steps!r}")
    common.use_output_options(args)

    import torch

    env = common.Environment.capture(torch.device("cpu"))
    env = dataclasses.replace(env, device=f"{common.cpu_model()} ({os.cpu_count()} CPUs)")
    print(f"device: {env.device}\ntorch {env.torch}, commit {env.commit}\ncommand: {env.command}", flush=True)
    which = dict(touch=args.touch, keep=args.keep, install="install" in steps, jit="jit" in steps)
    runs = ([measure(args.baseline, **which)] if args.baseline else []) + [measure(None, **which)]
    body = (f"Wall seconds of each step, the CPU seconds it used (with every process it waited for: pip, ninja, "
            f"the compilers) and the 1-minute load average of the machine before it: the CPUs are shared, so the "
            f"wall time depends on the load, the CPU time much less. MAX_JOBS "
            f"{os.environ.get('MAX_JOBS', 'unset (ninja: CPUs + 2 jobs)')}.\n\n{table(runs)}")
    print(body)
    if args.write_results:
        common.update_results_md(BENCH, "Build and install times (`bench_build.py`)", body, env)
        print(f"wrote {common.RESULTS_MD} and {append_csv(runs, env)}")


if __name__ == "__main__":
    main()
