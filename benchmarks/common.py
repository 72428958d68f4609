"""Shared benchmark harness: timing, peak memory, environment stamps, tables, CSV and RESULTS.md.

Timing. On CUDA ``triton.testing.do_bench`` gives the 0.5/0.2/0.8 quantiles of each provider in turn
(``time_cuda``: at least 5 timed calls; a call too slow for that many in do_bench's budget is timed with CUDA
events instead). On CPU wall clock is noisy (the machines are shared), so ``time_cpu`` runs every provider once
per round, rotating the order between rounds, and reports the median and the minimum over rounds after a warm-up.

Memory. On CUDA: ``torch.cuda.max_memory_allocated`` during one call, minus what was allocated before
("peak"). On CPU there is no allocator high-water mark, so the figure is the bytes autograd keeps for the
backward pass: unique storages seen by ``torch.autograd.graph.saved_tensors_hooks`` during the forward
("saved"; the parameters' own storages left out, forward-only calls save nothing). The table says which.

Every figure in ``RESULTS.md`` and ``results/*.csv`` is written by these functions, never by hand. Every script
takes ``--results-dir DIR`` (write ``DIR/RESULTS.md`` and ``DIR/results/*.csv`` instead of the ones beside this
file; ``merge_results`` merges such a folder back) and ``--commit ID`` (the commit recorded with the figures when
the sources are not a git checkout), through :func:`add_output_options` and :func:`start`.
"""
from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
QUANTILES = (0.5, 0.2, 0.8)
# Environment variables that change what runs; recorded in front of the command line when set.
ENV_VARS = ("PYTHONPATH", "ROBUSTKERN_BACKEND", "TRITON_INTERPRET", "AUTO_LIRPA_PATH")


# ----------------------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The key of a CSV row: the GPU's name, or the CPU model with the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"{cpu_model()} ({n} thread{'s' if n != 1 else ''})"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing or broken package is reported, not fatal
        return "absent"


_COMMIT: list[str] = []   # --commit, when given


def git_commit() -> str:
    """The checked-out commit (short), with ``+dirty`` when the work tree differs; where there is no git
    repository (a copy of the sources) the ``--commit`` given to the script, else ``none``."""
    root = BENCH_DIR.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return _COMMIT[0] if _COMMIT else "none"
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    return head + ("+dirty" if dirty.strip() else "")


@dataclass(frozen=True)
class Environment:
    device: str
    torch: str
    triton: str
    commit: str
    date: str
    command: str

    @classmethod
    def capture(cls, device: torch.device) -> "Environment":
        argv = [Path(sys.argv[0]).as_posix()] + _without_output_options(sys.argv[1:])
        if argv[0].startswith(str(BENCH_DIR.parent)):
            argv[0] = os.path.relpath(argv[0], BENCH_DIR.parent)
        env = " ".join(f"{k}={os.environ[k]}" for k in ENV_VARS if k in os.environ)
        command = (env + " " if env else "") + "python " + shlex.join(argv)
        return cls(device=device_name(device), torch=torch.__version__, triton=_version("triton"),
                   commit=git_commit(), date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   command=command)


def _without_output_options(args: list[str]) -> list[str]:
    """``args`` less ``--results-dir``/``--commit`` and their values: where figures go does not change them."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--results-dir", "--commit"):
            skip = True
        elif not a.startswith(("--results-dir=", "--commit=")):
            out.append(a)
    return out


def add_output_options(parser) -> None:
    """``--results-dir`` and ``--commit``, which every benchmark script takes (see the module doc)."""
    parser.add_argument("--results-dir", type=Path, default=None, metavar="DIR",
                        help="write DIR/RESULTS.md and DIR/results/<bench>.csv (default: beside this script)")
    parser.add_argument("--commit", default=None, metavar="ID",
                        help="the commit recorded with the results when the sources are not a git checkout")


def use_output_options(args) -> None:
    """Apply ``--results-dir`` and ``--commit`` of parsed ``args`` (from :func:`add_output_options`)."""
    global RESULTS_DIR, RESULTS_MD
    if getattr(args, "results_dir", None) is not None:
        RESULTS_DIR, RESULTS_MD = args.results_dir / "results", args.results_dir / "RESULTS.md"
    if getattr(args, "commit", None):
        _COMMIT[:] = [args.commit]


def start(device: torch.device, threads: int = 0, args=None) -> "Environment":
    """Apply the output options of ``args`` (:func:`use_output_options`), set the torch thread count (0: leave
    torch's default), capture and print the environment."""
    if args is not None:
        use_output_options(args)
    if threads:
        torch.set_num_threads(threads)
    env = Environment.capture(device)
    print(f"device: {env.device}\ntorch {env.torch}, triton {env.triton}, commit {env.commit}\n"
          f"command: {env.command}")
    return env


def import_auto_lirpa(path: str | None):
    """auto_LiRPA, imported with the folders of ``path`` (separated by ``os.pathsep``) first on ``sys.path``;
    ``RuntimeError`` saying why when it does not import (the benchmarks then leave its rows out)."""
    import importlib

    for p in reversed((path or "").split(os.pathsep)):
        if p and p not in sys.path:
            sys.path.insert(0, p)
    try:
        return importlib.import_module("auto_LiRPA")
    except Exception as e:  # noqa: BLE001 - any import failure means "unavailable"
        raise RuntimeError(f"auto_LiRPA not importable ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------- measurement
@dataclass
class Timing:
    median_ms: float
    low_ms: float            # CPU: minimum over rounds; CUDA: 0.2 quantile
    high_ms: float           # CPU: maximum over rounds; CUDA: 0.8 quantile
    samples: int             # timed calls (-1: unknown)


def timing_from_samples(ms: Sequence[float]) -> Timing:
    """Median and 0.2/0.8 quantiles of per-call times (linear interpolation between order statistics, as
    ``torch.quantile`` and ``triton.testing.do_bench`` compute them); ``samples`` = their number."""
    if not ms:
        raise ValueError("timing_from_samples: no timed calls")
    xs = sorted(float(v) for v in ms)

    def quantile(q: float) -> float:
        point = q * (len(xs) - 1)
        lo, hi = math.floor(point), math.ceil(point)
        return xs[lo] + (point - lo) * (xs[hi] - xs[lo])

    med, q20, q80 = (quantile(q) for q in QUANTILES)
    return Timing(med, q20, q80, samples=len(xs))


def needs_own_loop(estimate_ms: float, rep_ms: float, min_reps: int) -> bool:
    """Whether ``do_bench(rep=rep_ms)`` would time fewer than ``min_reps`` calls of a call of ``estimate_ms``
    (it times ``max(1, int(rep / estimate))`` calls), so that ``time_cuda`` times ``min_reps`` calls itself."""
    return estimate_ms > 0 and max(1, int(rep_ms / estimate_ms)) < min_reps


def _cuda_event_times(fn: Callable[[], object], n: int, grad_to_none=None) -> list[float]:
    """Milliseconds of ``n`` calls of ``fn``, each between a pair of CUDA events on the current stream (the
    gradients of ``grad_to_none`` cleared before each call, outside the timed span); one synchronisation at
    the end, as in ``do_bench``. No L2 flush between calls: this path is for calls of tens of ms and more."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for start_event, end_event in zip(starts, ends):
        for t in grad_to_none or ():
            t.grad = None
        start_event.record()
        fn()
        end_event.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_cuda(fn: Callable[[], object], grad_to_none=None, rep_ms: int = 200, min_reps: int = 5) -> Timing:
    """Median and 0.2/0.8 quantiles of ``fn`` on the current CUDA device over at least ``min_reps`` timed calls.

    One untimed call, then one call timed with CUDA events gives an estimate. ``triton.testing.do_bench(rep=
    rep_ms)`` times ``int(rep_ms / estimate)`` calls, a single one for calls over ``rep_ms / 2``; when that is
    fewer than ``min_reps`` (``needs_own_loop``) the ``min_reps`` calls are timed here with CUDA events
    (``_cuda_event_times``), else ``do_bench`` times them (with its own warm-up and L2 flushes). Either way the
    per-call times become the ``Timing`` (``timing_from_samples``)."""
    if min_reps < 1:
        raise ValueError(f"time_cuda: min_reps must be >= 1, got {min_reps}")
    fn()                                                           # warm-up (compilation, allocator)
    torch.cuda.synchronize()
    estimate_ms = _cuda_event_times(fn, 1, grad_to_none)[0]
    if needs_own_loop(estimate_ms, rep_ms, min_reps):
        return timing_from_samples(_cuda_event_times(fn, min_reps, grad_to_none))
    import triton.testing

    try:
        times = triton.testing.do_bench(fn, grad_to_none=grad_to_none, rep=rep_ms, return_mode="all")
    except (AssertionError, TypeError):   # a Triton without return_mode="all": its quantiles, count unknown
        med, q20, q80 = triton.testing.do_bench(fn, grad_to_none=grad_to_none, rep=rep_ms,
                                                quantiles=list(QUANTILES))
        return Timing(med, q20, q80, samples=-1)
    return timing_from_samples(times)


def layer_input_shapes(model: torch.nn.Module, x: torch.Tensor, kinds: tuple) -> list[tuple[torch.nn.Module, tuple]]:
    """``(layer, input shape)`` of every module of ``model`` that is an instance of ``kinds``, from one forward of the
    batch ``x``."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, tuple(inp[0].shape))))
             for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def time_cpu(fns: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1,
             clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Wall-clock every callable once per round, interleaved, the order rotated each round (``clock``: another
    clock in seconds, e.g. ``time.thread_time`` for the CPU time of this thread, which time spent waiting for
    other processes on a shared machine does not inflate). Returns median / min / max over rounds per name."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = clock()
            fns[name]()
            samples[name].append((clock() - t0) * 1e3)
    return {n: Timing(statistics.median(s), min(s), max(s), len(s)) for n, s in samples.items()}


def saved_tensor_bytes(fn: Callable[[], object], exclude=()) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn`` runs, leaving out the storages
    of the tensors in ``exclude`` (the parameters, which exist whether or not anything is saved)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    @torch.compiler.disable  # counted at run time, not traced into a compiled graph
    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def torch_peak_bytes(fn: Callable[[], object]) -> int:
    """The peak of the bytes held by torch tensors allocated while ``fn`` runs: the running sum of the allocation
    and free records of ``torch.profiler`` (``profile_memory=True``), in time order. A free of memory allocated
    before the call lowers the sum, so the figure is a lower bound when ``fn`` frees earlier tensors (the
    benchmarks' calls free at most the previous gradients). On CPU this is the accounting that
    ``torch.cuda.max_memory_allocated`` gives on CUDA."""
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in records:
        now += nbytes
        peak = max(peak, now)
    return peak


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls and convolutions (forward and backward) that ``fn`` runs, as counted by
    ``torch.utils.flop_counter``; custom ops are not counted, so count a provider made of aten ops."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def cuda_matmul_flops_per_s(device: torch.device, n: int = 8192) -> float:
    """Measured float32 matmul rate with IEEE products (TF32 off, as in bound computations)."""
    import triton.testing

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ms = triton.testing.do_bench(lambda: a @ b, rep=200)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n**3 / (ms * 1e-3)


def memory_kind(device: torch.device) -> str:
    return "peak" if device.type == "cuda" else "saved"


# ----------------------------------------------------------------------------------------------- rows, table
@dataclass
class Row:
    """One measured (case, provider). ``case`` holds the benchmark's own keys (model, batch, eps, mode...)."""
    case: dict
    provider: str
    timing: Timing | None = None
    mem_bytes: int | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.timing is not None


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def ratio(row: Row, ref: Row | None) -> float | None:
    """How many times longer ``row`` takes than ``ref`` (medians)."""
    if ref is None or not (row.ok and ref.ok):
        return None
    return row.timing.median_ms / ref.timing.median_ms


def table(rows: list[Row], case_keys: list[str], device: torch.device, ours: str, floor: str,
          peak_flops_per_s: float | None = None, mem: str | None = None) -> str:
    """A markdown table: one line per row; ``x <ours>`` is each provider's median over ours (above 1: ours is
    faster), ``x <floor>`` the same over the floor provider. Rows with ``extra["gflop"]`` (the work of the
    computation, the same for every provider of a case) get an achieved GFLOP/s column, and a % of the
    measured matmul rate when ``peak_flops_per_s`` is given. ``mem``: the memory column's heading (default
    "saved MB" on CPU, "peak MB" on CUDA)."""
    low, high = ("min", "max") if device.type == "cpu" else ("p20", "p80")
    mem = mem or ("saved MB" if device.type == "cpu" else "peak MB")
    rate = any(r.extra.get("gflop") for r in rows)
    head = case_keys + ["provider", "median ms", f"{low} ms", f"{high} ms", f"x {ours}", f"x {floor}", mem]
    head += (["GFLOP/s"] if rate else []) + (["% matmul peak"] if rate and peak_flops_per_s else []) + ["note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_case: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        by_case.setdefault(tuple(r.case[k] for k in case_keys), {})[r.provider] = r
    for key, provs in by_case.items():
        for r in provs.values():
            t = r.timing
            cells = [str(v) for v in key] + [f"**{r.provider}**" if r.provider == ours else r.provider]
            cells += [_fmt(t and t.median_ms), _fmt(t and t.low_ms), _fmt(t and t.high_ms),
                      _fmt(ratio(r, provs.get(ours)), 2), _fmt(ratio(r, provs.get(floor)), 2),
                      _fmt(r.mem_bytes / 2**20 if r.mem_bytes is not None else None)]
            achieved = r.extra.get("gflop") / (t.median_ms * 1e-3) if rate and t and r.extra.get("gflop") else None
            if rate:
                cells.append(_fmt(achieved, 0))
            if rate and peak_flops_per_s:
                cells.append(_fmt(achieved and 100 * achieved * 1e9 / peak_flops_per_s, 1))
            cells.append(r.note.replace("|", "\\|").replace("\n", " "))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- persistence
def append_csv(bench: str, rows: list[Row], env: Environment, device: torch.device) -> Path:
    """Append rows to ``results/<bench>.csv`` (header written once), keyed by device name."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{bench}.csv"
    records = []
    for r in rows:
        t = r.timing
        records.append({
            "bench": bench, "device": env.device, **{f"case_{k}": v for k, v in r.case.items()},
            "provider": r.provider,
            "median_ms": t and round(t.median_ms, 4), "low_ms": t and round(t.low_ms, 4),
            "high_ms": t and round(t.high_ms, 4), "samples": t and t.samples,
            "mem_bytes": r.mem_bytes, "mem_kind": memory_kind(device),
            "note": r.note, **r.extra,
            **{k: v for k, v in asdict(env).items() if k != "device"},
        })
    fields = list(dict.fromkeys(k for rec in records for k in rec))
    if path.exists():
        with open(path, newline="") as f:
            old_fields = next(csv.reader(f), [])
        if old_fields and old_fields != fields:          # schema changed: keep both, start a new file
            path = RESULTS_DIR / f"{bench}-{datetime.date.today().isoformat()}.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(records)
    return path


BLOCK = re.compile(r"<!-- BEGIN (\S+) (\S+) -->.*?<!-- END \1 \2 -->", re.S)
_DATE = re.compile(r"^- date: (\S+)$", re.M)


def _put_block(text: str, bench: str, tag: str, block: str) -> str:
    """``text`` with the block ``<bench> <tag>`` replaced by ``block``, or ``block`` inserted after the line
    ``<!-- <bench> sections -->`` when there is one, else at the end."""
    begin, end = f"<!-- BEGIN {bench} {tag} -->", f"<!-- END {bench} {tag} -->"
    if begin in text and end in text:
        return text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    anchor = f"<!-- {bench} sections -->"
    return text.replace(anchor, anchor + "\n\n" + block) if anchor in text else text.rstrip() + "\n\n" + block + "\n"


def update_results_md(bench: str, title: str, body: str, env: Environment, variant: str = "") -> None:
    """Write the latest run of ``bench`` on this device (and ``variant``, e.g. the sizes) into RESULTS.md as
    the block ``<!-- BEGIN <bench> <tag> --> ... <!-- END <bench> <tag> -->``, replacing the previous one;
    blocks of other devices and variants are kept. A new block goes after the line ``<!-- <bench> sections -->``
    when there is one, else at the end."""
    heading = f"{env.device}, {variant}" if variant else env.device
    tag = re.sub(r"[^A-Za-z0-9]+", "-", heading).strip("-").lower()
    block = "\n".join([
        f"<!-- BEGIN {bench} {tag} -->", f"### {title}: {heading}", "",
        f"- date: {env.date}", f"- commit: `{env.commit}`", f"- torch {env.torch}, triton {env.triton}",
        f"- command: `{env.command}`", "", body, f"<!-- END {bench} {tag} -->"])
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_MD.write_text(_put_block(text, bench, tag, block))


def _block_date(block: str) -> datetime.datetime | None:
    m = _DATE.search(block)
    try:
        return datetime.datetime.fromisoformat(m.group(1)) if m else None
    except ValueError:
        return None


def merge_results_md(src: Path, dst: Path) -> list[str]:
    """Put the blocks of ``src`` into ``dst`` where ``dst`` lacks them or holds an older one (by the blocks'
    ``- date:`` lines); nothing outside blocks changes. Returns the ``bench tag`` of each block applied."""
    if not src.exists():
        return []
    text = dst.read_text() if dst.exists() else "# Benchmark results\n"
    have = {(m.group(1), m.group(2)): m.group(0) for m in BLOCK.finditer(text)}
    applied = []
    for m in BLOCK.finditer(src.read_text()):
        (bench, tag), block = (m.group(1), m.group(2)), m.group(0)
        old = have.get((bench, tag))
        if old == block:
            continue
        if old is not None:
            new_date, old_date = _block_date(block), _block_date(old)
            if new_date is not None and old_date is not None and new_date <= old_date:
                continue
        text = _put_block(text, bench, tag, block)
        applied.append(f"{bench} {tag}")
    if applied:
        dst.write_text(text)
    return applied


def merge_csv(src: Path, dst: Path) -> str:
    """Append the rows of ``src`` that ``dst`` (same header) lacks; a ``dst`` that does not exist is a copy of
    ``src``, one with another header is left alone. Returns a one-line report."""
    def rows(path: Path) -> list[list[str]]:
        with open(path, newline="") as f:
            return list(csv.reader(f))
    new = rows(src)
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        return f"{dst.name}: new file, {max(len(new) - 1, 0)} rows"
    old = rows(dst)
    if not new:
        return f"{dst.name}: nothing to merge"
    if old and new[0] != old[0]:
        return f"{dst.name}: its header differs from {src}'s: left out"
    have = {tuple(r) for r in old}
    missing = [r for r in new[1:] if tuple(r) not in have]
    with open(dst, "a", newline="") as f:
        w = csv.writer(f)
        if not old:
            w.writerow(new[0])
        w.writerows(missing)
    return f"{dst.name}: {len(missing)} rows appended"


def merge_results(src_dir: Path, dst_dir: Path = BENCH_DIR) -> list[str]:
    """Merge a ``--results-dir`` folder (its ``RESULTS.md`` blocks, newer ones only, and ``results/*.csv`` rows)
    into ``dst_dir`` (default: beside this script). Returns one report line per file."""
    applied = merge_results_md(src_dir / "RESULTS.md", dst_dir / "RESULTS.md")
    lines = [f"RESULTS.md: {len(applied)} block(s) applied" + (": " + "; ".join(applied) if applied else "")]
    lines += ["results/" + merge_csv(path, dst_dir / "results" / path.name)
              for path in sorted((src_dir / "results").glob("*.csv"))]
    return lines


if __name__ == "__main__":   # python benchmarks/common.py merge SRC_DIR [DST_DIR]
    if len(sys.argv) not in (3, 4) or sys.argv[1] != "merge":
        sys.exit("usage: python benchmarks/common.py merge RESULTS_DIR [INTO_DIR]   (INTO_DIR: default benchmarks/)")
    print("\n".join(merge_results(Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) == 4 else BENCH_DIR)))
