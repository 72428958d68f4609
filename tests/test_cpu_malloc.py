"""robustkern.cpu_malloc: glibc keeps freed memory after keep_freed_memory(), so a repeated step stops faulting."""
import os
import subprocess
import sys
import textwrap

import pytest

from robustkern import cpu_malloc

GLIBC = sys.platform.startswith("linux") and cpu_malloc._libc() is not None

_STEP_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from robustkern.cpu_malloc import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "1" else None
    torch.set_num_threads(1)

    def step():  # 40 MB (above glibc's largest dynamic mmap threshold) and 8 MB, filled, then freed
        a, b = torch.ones(10 * 2 ** 20), torch.ones(2 * 2 ** 20)
        return float(a[-1] + b[-1])

    for _ in range(6):  # the heap settles after a few steps (small allocations interleave with the large ones)
        step()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 10)
""")


def _faults_per_step(keep: bool) -> tuple[str, float]:
    env = dict(os.environ, MALLOC_ARENA_MAX="1")
    out = subprocess.run([sys.executable, "-c", _STEP_FAULTS, "1" if keep else "0"], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_keep_freed_memory_stops_the_page_faults_of_a_repeated_step():
    applied, with_keep = _faults_per_step(True)
    _, default = _faults_per_step(False)
    assert applied == "True"
    # default: the 48 MB are faulted in again every step (12288 pages of 4 KB; fewer with huge pages)
    assert default > 2000
    assert with_keep < default / 4


def test_bad_thresholds_raise():
    for bad in (-1, 2 ** 31, 1.5, True):
        with pytest.raises(ValueError, match="threshold"):
            cpu_malloc.keep_freed_memory(mmap_threshold=bad)
    with pytest.raises(ValueError, match="trim_threshold"):
        cpu_malloc.keep_freed_memory(trim_threshold=-5)


def test_not_glibc_is_a_no_op(monkeypatch):
    monkeypatch.setattr(cpu_malloc.sys, "platform", "darwin")
    assert cpu_malloc._libc() is None
    assert cpu_malloc.keep_freed_memory() is False


@pytest.mark.parametrize("argv, want", [(["info"], True), (["--no-keep-freed-memory", "info"], False),
                                        (["info", "--no-keep-freed-memory"], False)])
def test_cli_calls_it_unless_switched_off(monkeypatch, argv, want):
    from robustkern_cli import main as cli

    calls = []
    monkeypatch.setattr(cpu_malloc, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(argv) == 0          # main() applies it at start-up
    assert calls == ([1] if want else [])
