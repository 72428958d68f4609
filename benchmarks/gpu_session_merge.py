"""Merge what a GPU-session phase wrote (its copy of ``benchmarks/RESULTS.md`` and ``benchmarks/results/*.csv``)
into this checkout's, so that phases can be collected in any order (see ``gpu_session.sh collect``).

RESULTS.md: every ``<!-- BEGIN <bench> <tag> --> ... <!-- END <bench> <tag> -->`` block of the phase's file that is
absent here, or newer here by its ``- date:`` line, replaces (or is inserted like ``common.update_results_md``:
after ``<!-- <bench> sections -->``, else at the end) the block here. Nothing outside blocks is touched.
CSV: rows of the phase's file that this checkout's file of the same name and header lacks are appended; a file
absent here is copied; a file whose header differs is left out and reported.

    python benchmarks/gpu_session_merge.py PHASE_BENCHMARKS_DIR [LOCAL_BENCHMARKS_DIR]
"""
from __future__ import annotations

import csv
import datetime
import re
import shutil
import sys
from pathlib import Path

BLOCK = re.compile(r"<!-- BEGIN (\S+) (\S+) -->.*?<!-- END \1 \2 -->", re.S)
DATE = re.compile(r"^- date: (\S+)$", re.M)


def _date(block: str) -> datetime.datetime | None:
    m = DATE.search(block)
    try:
        return datetime.datetime.fromisoformat(m.group(1)) if m else None
    except ValueError:
        return None


def merge_results_md(src: Path, dst: Path) -> list[str]:
    """Apply the blocks of ``src`` that are new or newer to ``dst``; returns the applied ``bench tag`` keys."""
    if not src.exists():
        return []
    new_text = src.read_text()
    text = dst.read_text() if dst.exists() else "# Benchmark results\n"
    local = {(m.group(1), m.group(2)): m.group(0) for m in BLOCK.finditer(text)}
    applied = []
    for m in BLOCK.finditer(new_text):
        key, block = (m.group(1), m.group(2)), m.group(0)
        old = local.get(key)
        if old == block:
            continue
        if old is not None:
            d_new, d_old = _date(block), _date(old)
            if d_new is not None and d_old is not None and d_new <= d_old:
                continue
            text = text.replace(old, block)
        else:
            anchor = f"<!-- {key[0]} sections -->"
            text = (text.replace(anchor, anchor + "\n\n" + block) if anchor in text
                    else text.rstrip() + "\n\n" + block + "\n")
        applied.append(" ".join(key))
    if applied:
        dst.write_text(text)
    return applied


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def merge_csv(src: Path, dst: Path) -> str:
    """Append the rows of ``src`` missing from ``dst`` (same header); returns a one-line report."""
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return f"{dst.name}: new file, {max(len(_rows(src)) - 1, 0)} rows"
    new, old = _rows(src), _rows(dst)
    if not new:
        return f"{dst.name}: empty in the phase's copy"
    if old and new[0] != old[0]:
        return f"{dst.name}: header differs from this checkout's: LEFT OUT (see the phase's bundle)"
    have = {tuple(r) for r in old}
    missing = [r for r in new[1:] if tuple(r) not in have]
    if missing:
        with open(dst, "a", newline="") as f:
            w = csv.writer(f)
            if not old:
                w.writerow(new[0])
            w.writerows(missing)
    return f"{dst.name}: {len(missing)} rows appended"


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    src = Path(argv[0])
    dst = Path(argv[1]) if len(argv) == 2 else Path(__file__).resolve().parent
    applied = merge_results_md(src / "RESULTS.md", dst / "RESULTS.md")
    print(f"RESULTS.md: {len(applied)} block(s) applied" + (": " + "; ".join(applied) if applied else ""))
    for path in sorted((src / "results").glob("*.csv")):
        print("results/" + merge_csv(path, dst / "results" / path.name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
