"""How long installing robustkern takes, as a user would run it: the ahead-of-time build of robustkern._C with
pip, a re-install, and the JIT build on first use.

    python benchmarks/bench_build.py [--baseline REV] [--touch csrc/cpu/crown_cpu.cpp] [--write-results]

Each source tree (the work tree, tracked and untracked files; with ``--baseline`` also the git revision REV)
is copied into a temporary folder and installed there into its own virtual environment, which sees this
Python's packages (``--system-site-packages``: pip, setuptools, torch, ninja) but keeps the install to itself. Steps, each timed
by the wall clock of one command run in the copy:

1. ``clean install``: ``pip install --no-build-isolation -e .`` in the fresh copy;
2. ``re-install``: the same command again, nothing changed (what a second set-up line costs);
3. ``re-install, one .cpp touched``: the same after ``touch``-ing one source (``--touch``);
4. ``JIT first use``: ``robustkern._ext.load()`` in a new process that cannot import robustkern._C, with an
   empty cache (``XDG_CACHE_HOME``): the build a plain ``pip install -e .`` leaves for the first use;
5. ``JIT, next process``: the same call again, the library cached.

``MAX_JOBS`` is left as the user has it (unset: ninja runs CPUs + 2 jobs). The machine may be shared: the
1-minute load average before each step is recorded beside its time. ``--write-results`` writes the table into
``RESULTS.md`` (block "build") and appends the rows to ``results/build.csv``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
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
STEPS = ("clean install", "re-install", "re-install, one .cpp touched", "JIT first use", "JIT, next process")


@dataclasses.dataclass
class Step:
    name: str
    command: str
    seconds: float
    load1: float
    note: str = ""


def _copy_tree(rev: str | None, dest: Path) -> str:
    """The work tree (rev None: tracked and untracked, not ignored) or the revision ``rev`` into ``dest``;
    returns a label (the revision's short hash; the work tree's commit, ``+dirty`` when it differs)."""
    git = ["git", "-C", str(ROOT)]
    if rev is not None:
        archive = subprocess.run(git + ["archive", rev], capture_output=True, check=True).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(dest, filter="data")
        return subprocess.run(git + ["rev-parse", "--short", rev], capture_output=True, text=True,
                              check=True).stdout.strip()
    files = subprocess.run(git + ["ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return common.git_commit()


def _run(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, str]:
    """Run ``cmd``; (wall seconds, its output). Raises with the output's tail when it fails."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    output = proc.stdout + proc.stderr
    log.write_text(output)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}) in {cwd}:\n{output[-3000:]}")
    return seconds, output


def measure(rev: str | None, touch: str, keep: bool) -> tuple[str, list[Step]]:
    """The five steps for one source tree; (its label, the steps)."""
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
            seconds, output = _run(cmd, src, run_env, work / f"{len(steps)}.log")
            note = note_from(output) if note_from else ""
            steps.append(Step(name, command, seconds, load1, note))
            print(f"{label}: {name}: {seconds:.1f} s (load {load1:.2f}) {note}", flush=True)

        install = "pip install --no-build-isolation -e ."
        step(STEPS[0], [python] + INSTALL, install)
        step(STEPS[1], [python] + INSTALL, install)
        os.utime(src / touch)
        step(STEPS[2], [python] + INSTALL, f"touch {touch}; {install}")
        jit_env = {**env, "XDG_CACHE_HOME": str(cache), "ROBUSTKERN_JIT": "1"}
        load = "python -c 'from robustkern import _ext; _ext.load()'"
        step(STEPS[3], [python, "-c", JIT_LOAD], load, jit_env, _jit_note)
        step(STEPS[4], [python, "-c", JIT_LOAD], load, jit_env, _jit_note)
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
    head = "| step | command | " + " | ".join(f"`{label}` s (load)" for label, _ in runs) + " |"
    rows = [head, "|" + "---|" * (2 + len(runs))]
    for i, name in enumerate(STEPS):
        cells = [f"{steps[i].seconds:.1f} ({steps[i].load1:.2f})" for _, steps in runs]
        rows.append(f"| {name} | `{runs[-1][1][i].command}` | " + " | ".join(cells) + " |")
    notes = [f"- `{label}`, {s.name}: {s.note}" for label, steps in runs for s in steps if s.note]
    return "\n".join(rows + [""] + notes)


def append_csv(runs, env: common.Environment) -> Path:
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = common.RESULTS_DIR / f"{BENCH}.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["bench", "device", "tree", "step", "seconds", "load1", "command", "commit", "date"])
        for label, steps in runs:
            for s in steps:
                w.writerow([BENCH, env.device, label, s.name, round(s.seconds, 2), round(s.load1, 2), s.command,
                            env.commit, env.date])
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="REV", help="also measure this git revision (the 'before')")
    parser.add_argument("--touch", default="csrc/cpu/crown_cpu.cpp", help="the source touched in step 3")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies (their logs: N.log)")
    parser.add_argument("--write-results", action="store_true", help="write RESULTS.md and results/build.csv")
    args = parser.parse_args(argv)

    import torch

    env = common.Environment.capture(torch.device("cpu"))
    env = dataclasses.replace(env, device=f"{common.cpu_model()} ({os.cpu_count()} CPUs)")
    print(f"device: {env.device}\ntorch {env.torch}, commit {env.commit}\ncommand: {env.command}", flush=True)
    runs = ([measure(args.baseline, args.touch, args.keep)] if args.baseline else []) + \
        [measure(None, args.touch, args.keep)]
    body = (f"Wall seconds of each step, and the 1-minute load average of the machine before it (the CPUs are "
            f"shared). MAX_JOBS {os.environ.get('MAX_JOBS', 'unset (ninja: CPUs + 2 jobs)')}.\n\n{table(runs)}")
    print(body)
    if args.write_results:
        common.update_results_md(BENCH, "Build and install times (`bench_build.py`)", body, env)
        print(f"wrote {common.RESULTS_MD} and {append_csv(runs, env)}")


if __name__ == "__main__":
    main()
