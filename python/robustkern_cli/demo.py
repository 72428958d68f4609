"""``robustkern demo``: a tour on scikit-learn's 8x8 digits (embedded in scikit-learn, no download).

Trains digits_cnn three ways (standard, IBP certified training, Gaussian noise augmentation), measures clean,
PGD and IBP-verified accuracy of each, certifies a subset of the test set with randomised smoothing (Gaussian
model), prints one table and then, if matplotlib is installed, plots the certified-accuracy curve (without it
the plot is skipped with one line; the table is never lost). scikit-learn is checked before any work.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from robustkern.attacks import pgd, robust_accuracy

from .config import load_config
from .errors import EXIT_OK, ConfigError, MissingDependency, optional_import

__all__ = ["PARTS", "run_demo"]

# (run folder, recipe, what it is)
PARTS = (("standard", "digits_standard", "standard training"),
         ("ibp", "digits_ibp", "IBP certified training"),
         ("gaussian", "digits_gaussian", "Gaussian noise augmentation (Cohen et al.)"))
RADII = (0.25, 0.5, 0.75)


def _pgd_accuracy(model, ds, eps: float, steps: int, device: str) -> float:
    from .data import make_loader
    alpha = 2.5 * eps / steps  # Madry et al.'s step size rule
    res = robust_accuracy(model, make_loader(ds, 360), lambda x, y: pgd(model, x, y, eps, alpha, steps, norm="linf"),
                          device=device)
    return res["robust_accuracy"]


def _ibp_accuracy(model, ds, cfg, device: str) -> float:
    from .data import make_loader
    from .evaluate import verified_metrics
    return verified_metrics(model, make_loader(ds, 360), cfg, device, method="IBP")["verified_acc"]


def _check_out(out: Path, overwrite: bool) -> None:
    from .train import existing_run_files
    held = [f"{out / name}: {', '.join(files)}" for name, _, _ in PARTS
            if (files := existing_run_files(out / name))]
    if held and not overwrite:
        raise ConfigError(f"{out} already holds the demo's runs ({'; '.join(held)}): choose another --out, or "
                          "pass --overwrite to replace them")


def _print_table(rows: dict, eps: float, pgd_steps: int) -> None:
    cols = [("clean", "clean acc"), ("pgd", f"PGD-{pgd_steps} acc (Linf {eps:g})"),
            ("ibp", f"IBP-verified acc (Linf {eps:g})")] + \
        [(f"r{r:g}", f"smoothing cert. acc r={r:g}") for r in RADII] + [("acr", "ACR")]
    cell = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print()
    print("| model | " + " | ".join(c[1] for c in cols) + " |")
    print("|---|" + "|".join("---:" for _ in cols) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(cell(row.get(c[0])) for c in cols) + " |")
    print(flush=True)


def run_demo(args, progress: bool) -> int:
    """The demo with the parsed ``robustkern demo`` arguments; returns the exit code."""
    from .analyze import plot_curves
    from .certify import certify_checkpoint, certify_summary
    from .data import load_dataset, make_loader
    from .evaluate import clean_metrics, fill_all_defaults, model_from_config
    from .train import train
    optional_import("sklearn.datasets", "scikit-learn", "the demo (scikit-learn's digits data set)")
    t_start = time.perf_counter()
    if not args.threads:
        torch.set_num_threads(1)  # tiny models: extra threads only add synchronisation
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="robustkern-demo-"))
    _check_out(out, args.overwrite)
    ov = [f"training_params:epochs={args.epochs}"] if args.epochs is not None else []
    certify_ov = [f"certify_params:N={args.certify_n}", f"certify_params:max={args.certify_images}"]
    configs = {recipe: load_config(recipe, ov + (certify_ov if recipe == "digits_gaussian" else []),
                                   fill_defaults=fill_all_defaults) for _, recipe, _ in PARTS}
    ibp_cfg = configs["digits_ibp"]
    eps = float(ibp_cfg["training_params"]["epsilon"])
    test_ds = load_dataset("digits", "test")
    rows: dict = {}
    tsv = None

    for k, (name, recipe, what) in enumerate(PARTS, 1):
        cfg = configs[recipe]
        what = f"{what} (eps {eps:g})" if recipe == "digits_ibp" else what
        print(f"[{k}/{len(PARTS)}] {what} of digits_cnn on scikit-learn's digits "
              f"({cfg['training_params']['epochs']} epochs) -> {out}/{name}")
        train(cfg, out / name, device=args.device, progress=progress, log=lambda s: None, overwrite=args.overwrite)
        model = model_from_config(cfg, out / name / "checkpoint.pt").to(args.device).eval()
        row = rows[name] = {"clean": clean_metrics(model, make_loader(test_ds, 360), args.device)["acc"],
                            "pgd": _pgd_accuracy(model, test_ds, eps, args.pgd_steps, args.device),
                            "ibp": _ibp_accuracy(model, test_ds, ibp_cfg, args.device)}
        if name == "gaussian":
            cp = cfg["certify_params"]
            cp["N0"] = min(int(cp["N0"]), int(cp["N"]))
            path = out / name / f"certify_sigma{float(cp['sigma']):g}.tsv"
            print(f"      certifying {args.certify_images} test images (sigma {cp['sigma']:g}, N0 {cp['N0']}, "
                  f"N {cp['N']}, alpha {cp['alpha']:g}) -> {path}")
            certify_checkpoint(cfg, model, path, device=args.device, progress=progress,
                               weights=out / name / "checkpoint.pt", overwrite=args.overwrite)
            summ = certify_summary(path, RADII)[0]
            row.update({f"r{r:g}": summ[f"{r:g}"] for r in RADII}, acr=summ["acr"])
            tsv = path

    _print_table(rows, eps, args.pgd_steps)
    if tsv is not None:
        try:
            plot = plot_curves([tsv], out / "certified_accuracy.png")
            print(f"plot: {plot} (smoothing certified accuracy vs L2 radius, gaussian model)")
        except MissingDependency as exc:
            print(f"plot skipped: {exc}")
    print(f"demo finished in {time.perf_counter() - t_start:.1f} s; runs in {out}")
    return EXIT_OK
