"""MACER loss tail: forward + backward of ``robustkern.ops.macer_tail`` (auto backend: on CPU the reference with the
softmax cache, on CUDA the Triton kernels) against the original's autograd
(``robustkern.reference.macer.macer_tail_terms_reference``, RuntianZ/macer's arithmetic), at (B, k, C) =
(64, 16, 10) and (64, 16, 1000).

    PYTHONPATH=python:. python benchmarks/bench_macer_tail.py --device cpu --threads 1 [--rounds 400] [--repeats 3]
    PYTHONPATH=python:. python benchmarks/bench_macer_tail.py --device cuda --write-results

Each repeat times both providers (CPU: ``common.time_cpu``, interleaved, one call each per round, order rotated;
CUDA: ``common.time_cuda`` per provider) and prints medians and the ratio; on a loaded machine take the median of
the repeats' ratios. The table, the CSV row and the RESULTS block show the repeat whose ratio is that median (the
lower one for an even number of repeats). Memory: on CPU "saved MB", bytes autograd keeps for the backward; on
CUDA "peak MB", peak allocated during one forward + backward. The op is called with ``check_labels=False``, as
``macer_loss`` does."""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from robustkern.ops import macer_tail  # noqa: E402
from robustkern.reference.published.macer import macer_tail_terms_reference  # noqa: E402

BENCH = "macer_tail"
SIGMA, GAMMA, BETA, LBD = 0.25, 8.0, 16.0, 12.0
SIZES = ((64, 16, 10), (64, 16, 1000))


def median_repeat(ratios: list[float]) -> int:
    """Index of the repeat whose ratio is the median of ``ratios`` (the lower median for an even count)."""
    if not ratios:
        raise ValueError("median_repeat: no repeats")
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    return order[(len(ratios) - 1) // 2]


def run_case(b: int, k: int, c: int, args, device: torch.device) -> list[common.Row]:
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(b, k, c, generator=g) * 0.3).to(device).requires_grad_()   # drawn on the CPU: same inputs
    y = torch.randint(0, c, (b,), generator=g).to(device)

    def original():
        z.grad = None
        cl, rl = macer_tail_terms_reference(z, y, SIGMA, GAMMA, BETA)
        (cl + LBD * rl).backward()

    def robustkern():
        z.grad = None
        cl, rl = macer_tail(z, y, beta=BETA, gamma=GAMMA, sigma=SIGMA, check_labels=False)
        (cl.sum() + LBD * rl.sum()).backward()

    def fwd(f):
        def run():
            cl, rl = f()
            return cl.sum() + LBD * rl.sum()
        return run

    fns = {"original": original, "robustkern": robustkern}
    if device.type == "cuda":
        for f in fns.values():                               # compile the kernels before the memory pass
            f()
        mem = {n: common.cuda_peak_bytes(f, device) for n, f in fns.items()}
    else:
        mem = {"original": common.saved_tensor_bytes(fwd(lambda: macer_tail_terms_reference(z, y, SIGMA, GAMMA,
                                                                                             BETA))),
               "robustkern": common.saved_tensor_bytes(fwd(lambda: macer_tail(z, y, beta=BETA, gamma=GAMMA,
                                                                             sigma=SIGMA, check_labels=False)))}
    ratios, timings = [], []
    rounds = args.rounds if c <= 10 else max(args.rounds // 5, 10)
    for rep in range(args.repeats):
        if device.type == "cuda":
            t = {n: common.time_cuda(f, grad_to_none=[z]) for n, f in fns.items()}
            over = f"timed calls {t['original'].samples}/{t['robustkern'].samples}"
        else:
            t = common.time_cpu(fns, rounds=rounds, warmup=3)
            over = f"{rounds} rounds"
        timings.append(t)
        ratios.append(t["original"].median_ms / t["robustkern"].median_ms)
        print(f"(B,k,C)=({b},{k},{c}) repeat {rep}: original {t['original'].median_ms:.3f} ms, robustkern "
              f"{t['robustkern'].median_ms:.3f} ms (fwd+bwd medians over {over}), "
              f"x robustkern {ratios[-1]:.2f}", flush=True)
    kind = "saved" if device.type == "cpu" else "peak"
    median = statistics.median(ratios)
    print(f"(B,k,C)=({b},{k},{c}): median x robustkern {median:.2f} (above 1: robustkern "
          f"faster); {kind} MB original {mem['original'] / 2**20:.2f}, robustkern "
          f"{mem['robustkern'] / 2**20:.2f}", flush=True)
    shown = median_repeat(ratios)
    case = {"batch": b, "copies": k, "classes": c}
    note = (f"repeat {shown} of {args.repeats} (median ratio); median over repeats of x robustkern {median:.2f}; "
            f"ratios {', '.join(f'{r:.2f}' for r in ratios)}")
    return [common.Row(case, n, timings[shown][n], mem[n], note if n == "robustkern" else "",
                       {"repeat": shown, "repeats": args.repeats}) for n in fns]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs only)")
    ap.add_argument("--rounds", type=int, default=400, help="CPU rounds at C = 10 (C = 1000: a fifth)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-save", action="store_true", help="do not append the rows to results/macer_tail.csv")
    ap.add_argument("--write-results", action="store_true", help="write this run's block into RESULTS.md")
    common.add_output_options(ap)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    device = torch.device(args.device)
    env = common.start(device, args.threads if device.type == "cpu" else 0, args=args)
    rows = []
    for b, k, c in SIZES:
        rows += run_case(b, k, c, args, device)
    text = common.table(rows, ["batch", "copies", "classes"], device, ours="robustkern", floor="original")
    print("\n" + text)
    if not args.no_save:
        print(f"\nappended to {common.append_csv(BENCH, rows, env, device)}")
    if args.write_results:
        if device.type == "cuda":
            how = ("median, p20/p80 from `common.time_cuda` (triton do_bench, at least 5 timed calls) per provider; "
                   "peak MB = peak allocated during one forward + backward; robustkern: the Triton kernels")
        else:
            how = (f"threads {torch.get_num_threads()}; median/min/max over {args.rounds} interleaved rounds at C = "
                   f"10, {max(args.rounds // 5, 10)} at C = 1000; saved MB = bytes autograd keeps for the "
                   "backward; robustkern: the reference with the softmax cache")
        body = "\n".join([
            f"- forward + backward of (cl + {LBD} rl) with sigma {SIGMA}, gamma {GAMMA}, beta {BETA}, "
            "`check_labels=False`; original = `macer_tail_terms_reference` under autograd (RuntianZ/macer's "
            "arithmetic)",
            f"- {how}; `x robustkern` = provider median / robustkern median (above 1: robustkern faster); "
            f"each case shows the repeat with the median ratio of {args.repeats}",
            "", text])
        common.update_results_md(BENCH, "MACER loss tail (forward + backward)", body, env)
        print(f"updated {common.RESULTS_MD}")


if __name__ == "__main__":
    main()
