"""robustkern: train, evaluate, certify and analyse robust models from JSON recipes.

Exit codes: 0 ok, 2 usage or configuration error, 3 data missing or unreadable, 4 the method needs a part of
the robustkern library that is not available yet.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import __version__
from .config import CONFIG_DIR, list_configs, load_config
from .errors import (EXIT_DATA, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, ConfigError, DataFormatError,
                     DataMissingError, MethodUnavailable, library_part)

EPILOG = "exit codes: 0 ok, 2 usage/config error, 3 data missing, 4 method not available yet"
OVERRIDES_HELP = ("config overrides 'section:key=value', nested 'training_params:method_params:bound_type=interval'; "
                  "values are typed by the key's current value (floats may be fractions such as 8/255)")


def _err(msg: str) -> None:
    print(f"robustkern: {msg}", file=sys.stderr)


def _fill_all(cfg: dict) -> None:
    from .evaluate import fill_eval_defaults
    from .losses import fill_method_defaults
    fill_method_defaults(cfg)
    fill_eval_defaults(cfg)


def _config_from(args, base_cfg=None) -> dict:
    if getattr(args, "config", None) is None and base_cfg is None:
        raise ConfigError("--config is required (a recipe name such as 'digits_standard' or a JSON path); "
                          f"recipes: {', '.join(list_configs())}")
    return load_config(getattr(args, "config", None) if base_cfg is None else None, args.overrides,
                       fill_defaults=_fill_all, base_cfg=base_cfg)


def _keep_freed_memory() -> bool:
    """The command's CPU work allocates the same tensor sizes every step: keep freed memory in the process so
    that pages are not faulted in and zeroed again each step (robustkern.cpu_malloc; off with
    ROBUSTKERN_KEEP_FREED_MEMORY=0)."""
    from robustkern import cpu_malloc
    return cpu_malloc.enabled_by_env() and cpu_malloc.keep_freed_memory()


def _progress(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


# ----------------------------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from .checkpoint import load_checkpoint
    from .train import default_run_dir, train
    resume = None
    if args.resume not in (None, "auto") and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)  # "--resume section:key=value": the override is not a path
        args.resume = "auto"
    if args.resume is not None:
        if args.resume == "auto":
            if args.out is None and args.config is None:
                raise ConfigError("--resume without a path needs --out DIR or --config to find the run directory")
            run_dir = Path(args.out) if args.out else default_run_dir(_config_from(args))
            resume = run_dir / "checkpoint.pt"
        else:
            resume = Path(args.resume)
        ckpt = load_checkpoint(resume)
        if args.config is not None and args.resume != "auto":
            _err(f"note: resuming uses the config stored in {resume}; --config is ignored (overrides apply)")
        cfg = _config_from(args, base_cfg=ckpt["config"])
        out = Path(args.out) if args.out else resume.parent
    else:
        cfg = _config_from(args)
        out = Path(args.out) if args.out else None
    if args.tensorboard is not None:  # kept in the checkpoint's config, so a resumed run logs on
        cfg["training_params"]["tensorboard"] = args.tensorboard
    result = train(cfg, out, data_dir=args.data_dir, download=args.download, resume=resume, device=args.device,
                   progress=_progress(args), log=(lambda s: None) if args.quiet else None)
    if result.rank == 0:
        print(json.dumps({"run_dir": str(result.run_dir), **result.final}, default=str))
    return EXIT_OK


def cmd_eval(args) -> int:
    from .evaluate import evaluate
    base = None
    if args.config is None and args.checkpoint:
        obj = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        base = obj.get("config") if isinstance(obj, dict) else None
        if base is None:
            raise ConfigError(f"{args.checkpoint} carries no config: pass --config naming the model and data set")
    cfg = _config_from(args, base_cfg=base)
    res = evaluate(cfg, args.checkpoint, data_dir=args.data_dir, download=args.download, device=args.device,
                   progress=_progress(args))
    print(json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return EXIT_OK


def _maybe_init_distributed(device: str) -> bool:
    """Under torchrun (WORLD_SIZE > 1) start the process group, so certify_dataset shards the images."""
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def cmd_certify(args) -> int:
    from .analyze import format_table, parse_radii
    from .certify import (certify_checkpoint, certify_params, certify_summary, default_outfile, default_radii,
                          is_rank0)
    from .evaluate import model_from_config
    base = None
    if args.config is None and args.checkpoint:
        if not Path(args.checkpoint).is_file():
            raise ConfigError(f"checkpoint {args.checkpoint} does not exist")
        obj = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        base = obj.get("config") if isinstance(obj, dict) else None
        if base is None:
            raise ConfigError(f"{args.checkpoint} carries no config: pass --config naming the model and data set")
    cfg = _config_from(args, base_cfg=base)
    p = certify_params(cfg)
    checkpoint = args.checkpoint or cfg["eval_params"]["checkpoint"] or None
    if not checkpoint:
        raise ConfigError("certify needs the base classifier's weights: --checkpoint FILE (or "
                          "eval_params:checkpoint=FILE)")
    if args.radii is not None:
        radii = parse_radii(args.radii)
    else:
        radii = default_radii(p["sigma"])
    if args.images_per_batch is not None and args.images_per_batch < 1:
        raise ConfigError(f"--images-per-batch must be >= 1, got {args.images_per_batch}")
    model = model_from_config(cfg, checkpoint)  # checks the checkpoint before any data is loaded
    if args.outfile:
        outfile = Path(args.outfile)
    else:
        out_dir = Path(args.out) if args.out else Path(checkpoint).parent
        outfile = default_outfile(out_dir, p["sigma"])
    device = args.device
    if _maybe_init_distributed(device) and device.startswith("cuda"):
        device = f"cuda:{torch.cuda.current_device()}"
    written = certify_checkpoint(cfg, model, outfile, data_dir=args.data_dir, download=args.download,
                                 device=device, progress=_progress(args), images_per_batch=args.images_per_batch)
    if not is_rank0():
        return EXIT_OK
    if Path(written) != outfile:  # shards run by hand (RANK/WORLD_SIZE without a process group)
        print(f"wrote {written}", file=sys.stderr)
        return EXIT_OK
    _err(f"certified with sigma={p['sigma']:g}, N0={p['n0']}, N={p['n']}, alpha={p['alpha']:g} -> {outfile}")
    sys.stdout.write(format_table(certify_summary(outfile, radii, int(cfg["certify_params"]["linf_dim"])),
                                  args.format))
    return EXIT_OK


def cmd_analyze(args) -> int:
    from .analyze import format_table, parse_radii, plot_curves, summarize
    scale = 1.0 / (args.linf_dim ** 0.5) if args.linf_dim else 1.0
    rows = summarize(args.logs, parse_radii(args.radii), scale=scale)
    sys.stdout.write(format_table(rows, args.format))
    if args.plot:
        print(f"plot: {plot_curves(args.logs, args.plot, scale=scale)}", file=sys.stderr)
    return EXIT_OK


def cmd_bench(args) -> int:
    from .data import dataset_info
    from .losses import LOSSES, StepState, check_available
    from .models import build_model_for
    from .train import build_optimizer
    cfg = _config_from(args)
    tp = cfg["training_params"]
    check_available(tp["method"], cfg)
    info = dataset_info(cfg["data"]["dataset"])
    bs = args.batch_size or cfg["data"]["batch_size"]
    torch.manual_seed(cfg["seed"])
    model = build_model_for(cfg["model"]["name"], cfg["model"]["kwargs"], info.shape, info.num_classes)
    model.to(args.device)
    x = torch.rand(bs, *info.shape, device=args.device)
    y = torch.randint(0, info.num_classes, (bs,), device=args.device)
    opt = build_optimizer(model.parameters(), tp)
    state = StepState(eps=float(tp["epsilon"]), max_eps=float(tp["epsilon"]))

    def step():
        loss, _ = LOSSES[tp["method"]](model, x, y, cfg, state)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def forward():
        with torch.no_grad():
            model(x)

    def timeit(fn, n):
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2]

    model.train()
    t_step = timeit(step, args.steps)
    model.eval()
    t_fwd = timeit(forward, args.steps)
    res = {"method": tp["method"], "model": cfg["model"]["name"], "batch": bs, "device": args.device,
           "threads": torch.get_num_threads(), "train_step_ms": round(t_step * 1e3, 3),
           "train_samples_per_s": round(bs / t_step, 1), "forward_ms": round(t_fwd * 1e3, 3),
           "params": sum(p.numel() for p in model.parameters()), "data": "synthetic uniform [0,1]"}
    print(json.dumps(res))
    return EXIT_OK


def _demo_pgd(model, ds, eps: float, steps: int, device: str) -> float:
    attacks = library_part("robustkern.attacks", "pgd", "robust_accuracy",
                           purpose="the demo's PGD evaluation")
    from .data import make_loader
    alpha = 2.5 * eps / steps  # Madry et al.'s step size rule
    res = attacks.robust_accuracy(model, make_loader(ds, 360),
                                  lambda x, y: attacks.pgd(model, x, y, eps, alpha, steps, norm="linf"),
                                  device=device)
    return res["robust_accuracy"]


def _demo_ibp(model, ds, cfg, device: str) -> float:
    from .data import make_loader
    from .evaluate import verified_metrics
    from .losses import probe_bound_method
    probe_bound_method("IBP", "the demo's IBP-verified accuracy")
    return verified_metrics(model, make_loader(ds, 360), cfg, device, method="IBP")["verified_acc"]


def cmd_demo(args) -> int:
    from .analyze import plot_curves
    from .certify import certify_checkpoint, certify_summary
    from .data import load_dataset, make_loader
    from .evaluate import clean_metrics, model_from_config
    from .losses import check_available
    from .train import train
    t_start = time.perf_counter()
    if not args.threads:
        torch.set_num_threads(1)  # tiny models: extra threads only add synchronisation
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="robustkern-demo-"))
    ov = [f"training_params:epochs={args.epochs}"] if args.epochs else []
    missing: list[str] = []
    quiet = lambda s: None  # noqa: E731
    ibp_cfg = load_config("digits_ibp", ov, fill_defaults=_fill_all)
    eps = float(ibp_cfg["training_params"]["epsilon"])
    test_ds = load_dataset("digits", "test")
    radii = [0.25, 0.5, 0.75]
    rows = {}

    def unavailable(exc) -> None:
        print(f"      NOT AVAILABLE: {exc}")
        missing.append(str(exc))

    parts = (("standard", "digits_standard", "standard training"),
             ("ibp", "digits_ibp", f"IBP certified training (eps {eps:g})"),
             ("gaussian", "digits_gaussian", "Gaussian noise augmentation (Cohen et al.)"))
    for k, (name, recipe, what) in enumerate(parts, 1):
        cfg = ibp_cfg if recipe == "digits_ibp" else load_config(recipe, ov, fill_defaults=_fill_all)
        print(f"[{k}/{len(parts)}] {what} of digits_cnn on scikit-learn's digits "
              f"({cfg['training_params']['epochs']} epochs) -> {out}/{name}")
        row = rows[name] = {"clean": None, "pgd": None, "ibp": None}
        try:
            check_available(cfg["training_params"]["method"], cfg)
            train(cfg, out / name, device=args.device, progress=_progress(args), log=quiet)
        except (MethodUnavailable, NotImplementedError) as exc:
            unavailable(exc)
            continue
        model = model_from_config(cfg, out / name / "checkpoint.pt").to(args.device).eval()
        row["clean"] = clean_metrics(model, make_loader(test_ds, 360), args.device)["acc"]
        try:
            row["pgd"] = _demo_pgd(model, test_ds, eps, args.pgd_steps, args.device)
        except (MethodUnavailable, NotImplementedError) as exc:
            unavailable(exc)
        try:
            row["ibp"] = _demo_ibp(model, test_ds, ibp_cfg, args.device)
        except (MethodUnavailable, NotImplementedError) as exc:
            unavailable(exc)
        if name == "gaussian":
            cp = cfg["certify_params"]
            cp["N"] = args.certify_n
            cp["N0"] = min(int(cp["N0"]), args.certify_n)
            tsv = out / name / f"certify_sigma{float(cp['sigma']):g}.tsv"
            print(f"      certifying {args.certify_images} test images (sigma {cp['sigma']:g}, N0 {cp['N0']}, "
                  f"N {cp['N']}, alpha {cp['alpha']:g}) -> {tsv}")
            try:
                certify_checkpoint(cfg, model, tsv, device=args.device, progress=_progress(args),
                                   num_examples=args.certify_images)
                summ = certify_summary(tsv, radii)[0]
                row.update({f"r{r:g}": summ[f"{r:g}"] for r in radii}, acr=summ["acr"])
                plot = plot_curves([tsv], out / "certified_accuracy.png")
                row["plot"] = str(plot)
            except (MethodUnavailable, NotImplementedError) as exc:
                unavailable(exc)

    cols = [("clean", "clean acc"), ("pgd", f"PGD-{args.pgd_steps} acc (Linf {eps:g})"),
            ("ibp", f"IBP-verified acc (Linf {eps:g})")] + \
        [(f"r{r:g}", f"smoothing cert. acc r={r:g}") for r in radii] + [("acr", "ACR")]
    cell = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print()
    print("| model | " + " | ".join(c[1] for c in cols) + " |")
    print("|---|" + "|".join("---:" for _ in cols) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(cell(row.get(c[0])) for c in cols) + " |")
    print()
    if rows.get("gaussian", {}).get("plot"):
        print(f"plot: {rows['gaussian']['plot']} (smoothing certified accuracy vs L2 radius, gaussian model)")
    print(f"demo finished in {time.perf_counter() - t_start:.1f} s; runs in {out}")
    return EXIT_UNAVAILABLE if missing else EXIT_OK


def _library_parts() -> dict:
    import importlib.util
    parts = {}
    for mod in ("robustkern.nn", "robustkern.ops", "robustkern.bounds", "robustkern.smoothing",
                "robustkern.attacks", "robustkern.flatness"):
        try:
            parts[mod] = importlib.util.find_spec(mod) is not None
        except ImportError:
            parts[mod] = False
    return parts


def cmd_info(args) -> int:
    from .data import default_data_dir
    from .losses import LOSSES, METHOD_DEFAULTS, check_available
    from .models import MODEL_NAMES
    try:
        import robustkern
        lib_info = getattr(robustkern, "info", None)
    except ImportError:
        lib_info = None
    if callable(lib_info):
        out = lib_info()  # robustkern.info() prints its report (and returns it as a dict)
        if isinstance(out, str):
            print(out)
    else:
        import numpy
        versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
        for name in ("scipy", "sklearn", "triton"):
            try:
                versions[name] = __import__(name).__version__
            except ImportError:
                versions[name] = "not installed"
        print("robustkern.info() not available; versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        print(f"cuda available: {torch.cuda.is_available()}")
    parts = _library_parts()
    print(f"robustkern_cli {__version__}")
    print("library parts: " + ", ".join(f"{k} {'yes' if v else 'missing'}" for k, v in parts.items()))
    ready, missing = [], []
    for m in sorted(LOSSES):
        try:
            check_available(m, {"training_params": {"method_params": dict(METHOD_DEFAULTS[m])}})
            ready.append(m)
        except MethodUnavailable:
            missing.append(m)
    print("training methods: " + ", ".join(ready) + "; not available yet (exit 4): " + ", ".join(missing))
    print("models: " + ", ".join(MODEL_NAMES))
    print(f"configs ({CONFIG_DIR}): " + ", ".join(list_configs()))
    print(f"data dir: {default_data_dir()}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------- parser
def _add_common(p: argparse.ArgumentParser, config: bool = True, data: bool = True) -> None:
    if config:
        p.add_argument("--config", "-c", help="recipe name in python/configs (e.g. digits_standard) or a JSON path")
        p.add_argument("overrides", nargs="*", metavar="section:key=value", help=OVERRIDES_HELP)
    if data:
        p.add_argument("--data-dir", help="folder with the data sets (default $ROBUSTKERN_DATA or "
                                          "~/.robustkern/data)")
        p.add_argument("--download", action="store_true", help="download a missing data set (never by default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                   help="torch CPU threads (on a small or shared machine 1 is often fastest)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or per-epoch lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robustkern", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"robustkern_cli {__version__}")
    parser.add_argument("--threads", type=int, help="torch CPU threads (torch.set_num_threads)")
    sub = parser.add_subparsers(dest="command", metavar="command")
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("train", help="train a model from a recipe", formatter_class=raw, epilog=EPILOG, description=(
        "Train the model of a JSON recipe with its method (training_params:method): standard, gaussian\n"
        "(Cohen et al.'s noise augmentation), ibp / crown_ibp (need robustkern.bounds); the smoothing,\n"
        "adversarial and flatness methods exit 4 until their library parts exist. Every epoch writes\n"
        "<out>/checkpoint.pt (model, optimiser, config, epoch, metrics, RNG states) and <out>/log.csv;\n"
        "--resume continues exactly where a run stopped. Under torchrun the run is data-parallel\n"
        "(data:batch_size stays the global batch; rank 0 writes the files).\n\n"
        "examples:\n  robustkern train -c digits_standard\n"
        "  robustkern train -c digits_standard --tensorboard runs/tb/digits_standard\n"
        "  torchrun --nproc_per_node 4 -m robustkern_cli train -c cifar_crown_ibp_2_255 --device cuda\n"
        "  robustkern train -c cifar_crown_ibp_2_255 training_params:epochs=10 --data-dir ~/data\n"
        "  robustkern train --resume runs/digits_standard/checkpoint.pt training_params:epochs=20"))
    _add_common(p)
    p.add_argument("--out", "-o", help="run directory (default <output:dir>/<name>)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default: <out>/checkpoint.pt); its config is used, "
                        "overrides apply on top")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="write TensorBoard event files to DIR (default training_params:tensorboard; '' = none)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint", formatter_class=raw, epilog=EPILOG, description=(
        "Evaluate a checkpoint on the test split with eval_params:method: clean accuracy; ibp / crown_ibp\n"
        "verified accuracy at eval_params:epsilon (need robustkern.bounds); pgd / autoattack (need\n"
        "robustkern.attacks, exit 4 until it exists). A robustkern checkpoint carries its config, so\n"
        "--config may be left out; other checkpoints (Cohen, MACER, CROWN-IBP layouts) need one.\n\n"
        "examples:\n  robustkern eval --checkpoint runs/digits_standard/checkpoint.pt\n"
        "  robustkern eval -c cifar_crown_ibp_8_255 --checkpoint m.pth eval_params:epsilon=2/255"))
    _add_common(p)
    p.add_argument("--checkpoint", help="weights to evaluate (default eval_params:checkpoint)")
    p.add_argument("--json", metavar="FILE", help="also write the metrics to FILE")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("certify", help="randomised-smoothing certification", formatter_class=raw, epilog=EPILOG,
                       description=(
        "Certify the smoothed classifier of a checkpoint on the test split (Cohen et al.'s CERTIFY: N0\n"
        "selection and N estimation samples, Clopper-Pearson at alpha) with certify_params (sigma, N0, N,\n"
        "alpha, batch, skip, max), writing Cohen's TSV (idx label predict radius correct time) to\n"
        "<out>/certify_sigma<sigma>.tsv (default <out>: the checkpoint's folder) and printing certified\n"
        "accuracy at radii 0, 0.25, ... and the ACR. A rerun resumes: images already in the TSV are kept.\n"
        "Under torchrun the images are sharded over the ranks and rank 0 merges the log.\n\n"
        "examples:\n  robustkern certify --checkpoint runs/digits_gaussian/checkpoint.pt certify_params:N=1000\n"
        "  robustkern certify -c cohen_gaussian_0.25 --checkpoint noise_0.25/checkpoint.pth.tar --out logs\n"
        "  torchrun --nproc_per_node 4 -m robustkern_cli.main certify -c cohen_gaussian_0.25 --checkpoint m.pth"))
    _add_common(p)
    p.add_argument("--checkpoint", help="base classifier weights (default eval_params:checkpoint); a robustkern "
                                        "checkpoint carries its config, so --config may be left out")
    p.add_argument("--out", "-o", help="folder for the TSV (default: the checkpoint's folder)")
    p.add_argument("--outfile", help="the TSV path (default <out>/certify_sigma<sigma>.tsv)")
    p.add_argument("--radii", help="summary radii, start:stop:step or a comma list (default 0:max(1,4*sigma):0.25)")
    p.add_argument("--format", default="markdown", choices=("markdown", "tsv"), help="summary table format")
    p.add_argument("--images-per-batch", type=int,
                   help="images whose noisy copies share a forward (default max(1, batch // N), at most 64)")
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("analyze", help="certified accuracy and ACR from certify logs", formatter_class=raw,
                       epilog=EPILOG, description=(
        "Summarise certification logs in Cohen et al.'s TSV format (idx label predict radius correct time):\n"
        "certified accuracy at each radius, abstention rate and average certified radius (ACR); optionally\n"
        "plot the curves.\n\nexample:\n"
        "  robustkern analyze out/sigma_0.25.tsv out/sigma_0.5.tsv --radii 0:2:0.25 --plot curves.png"))
    p.add_argument("logs", nargs="+", help="certification log files")
    p.add_argument("--radii", default="0:2.25:0.25", help="start:stop:step or a comma list (default 0:2.25:0.25)")
    p.add_argument("--format", default="markdown", choices=("markdown", "tsv"))
    p.add_argument("--plot", metavar="FILE", help="save certified-accuracy curves to FILE (.png/.pdf/.svg)")
    p.add_argument("--linf-dim", type=int, default=0,
                   help="read L2 radii as L-inf radii: divide by sqrt(DIM) (TRADES+RS: 3072 for CIFAR)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("bench", help="time a recipe's training step and forward pass", formatter_class=raw,
                       epilog=EPILOG, description=(
        "Time one training step (the recipe's method: loss, backward, optimiser step) and one forward pass\n"
        "of its model on a synthetic batch of the data set's shape (no data files needed); prints the median\n"
        "over --steps runs as JSON. Methods whose library part is missing exit 4.\n\n"
        "example:\n  robustkern bench -c cifar_crown_ibp_8_255 --batch-size 64 --steps 5"))
    _add_common(p, data=False)
    p.add_argument("--batch-size", type=int, help="batch size (default data:batch_size)")
    p.add_argument("--steps", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="a few-minute tour on scikit-learn's digits", formatter_class=raw,
                       epilog=EPILOG, description=(
        "Train a small CNN on scikit-learn's 8x8 digits (embedded, no download) three ways: standard\n"
        "training, IBP certified training and Gaussian noise augmentation; certify a subset of the test set\n"
        "with randomised smoothing; then print one table: clean accuracy, PGD accuracy (L-inf eps of the IBP\n"
        "recipe), IBP-verified accuracy and smoothing certified accuracy at L2 radii 0.25/0.5/0.75 with the\n"
        "ACR (Gaussian model), and save <out>/certified_accuracy.png. About 25 s on 2 CPU cores.\n"
        "Parts whose library pieces are missing are reported and make the exit code 4."))
    _add_common(p, config=False, data=False)
    p.add_argument("--out", "-o", help="where to put the runs (default a new temporary folder)")
    p.add_argument("--epochs", type=int, help="epochs per part (default: the recipes' 10, 20 and 10)")
    p.add_argument("--certify-images", type=int, default=100, help="test images to certify (default 100)")
    p.add_argument("--certify-n", type=int, default=10000,
                   help="smoothing estimation samples N (default 10000: with alpha 0.001 the largest certifiable "
                        "radius is 3.2 sigma = 0.8; N = 1000 stops at 0.62)")
    p.add_argument("--pgd-steps", type=int, default=20, help="PGD steps (default 20)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="versions, library parts, models, recipes", formatter_class=raw,
                       epilog=EPILOG, description=(
        "Print robustkern.info() when the library provides it (else the versions of Python, torch and\n"
        "friends), which library parts are installed, and the app's methods, models and recipes."))
    p.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.threads:
        torch.set_num_threads(args.threads)
    _keep_freed_memory()
    try:
        return int(args.func(args) or EXIT_OK)
    except ConfigError as exc:
        _err(f"error: {exc}")
        return EXIT_USAGE
    except (DataMissingError, DataFormatError) as exc:
        _err(f"data: {exc}")
        return EXIT_DATA
    except MethodUnavailable as exc:
        _err(f"not available: {exc}")
        return EXIT_UNAVAILABLE
    except NotImplementedError as exc:  # raised by a library part for a case it does not support yet
        _err(f"not available: {exc or 'not implemented in the installed robustkern'}")
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
