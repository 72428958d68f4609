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
    result = train(cfg, out, data_dir=args.data_dir, download=args.download, resume=resume, device=args.device,
                   progress=_progress(args), log=(lambda s: None) if args.quiet else None)
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


def cmd_certify(args) -> int:
    cfg = _config_from(args)
    library_part("robustkern.smoothing", "Smooth", purpose="'robustkern certify' (randomised smoothing, "
                 f"sigma={cfg['certify_params']['sigma']})")
    raise MethodUnavailable("robustkern.smoothing is present, but the certify runner of this app version is not "
                            "written yet (python/robustkern_cli); use robustkern.smoothing directly")


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


def cmd_demo(args) -> int:
    from .evaluate import evaluate
    from .losses import check_available
    from .train import train
    if not args.threads:
        torch.set_num_threads(1)  # tiny models: extra threads only add synchronisation
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="robustkern-demo-"))
    ov = [f"training_params:epochs={args.epochs}"] if args.epochs else []
    missing = []
    cfg = load_config("digits_standard", ov, fill_defaults=_fill_all)
    print(f"[1/2] standard training of digits_cnn on scikit-learn's digits "
          f"({cfg['training_params']['epochs']} epochs) -> {out}/standard")
    res = train(cfg, out / "standard", device=args.device, progress=_progress(args), log=lambda s: None)
    print(f"      clean test accuracy {res.final['test_acc']:.3f}")
    cfg = load_config("digits_ibp", ov, fill_defaults=_fill_all)
    print(f"[2/2] IBP certified training on digits ({cfg['training_params']['epochs']} epochs, eps "
          f"{cfg['training_params']['epsilon']:g}), then IBP-verified accuracy -> {out}/ibp")
    try:
        check_available("ibp", cfg)
        res = train(cfg, out / "ibp", device=args.device, progress=_progress(args), log=lambda s: None)
        ev = evaluate(cfg, out / "ibp" / "checkpoint.pt", device=args.device)
        print(f"      clean {ev['acc']:.3f}, verified at eps={ev['epsilon']:g}: {ev['verified_acc']:.3f}")
    except (MethodUnavailable, NotImplementedError) as exc:
        print(f"      NOT AVAILABLE: {exc}")
        missing.append(str(exc))
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
        "--resume continues exactly where a run stopped.\n\n"
        "examples:\n  robustkern train -c digits_standard\n"
        "  robustkern train -c cifar_crown_ibp_2_255 training_params:epochs=10 --data-dir ~/data\n"
        "  robustkern train --resume runs/digits_standard/checkpoint.pt training_params:epochs=20"))
    _add_common(p)
    p.add_argument("--out", "-o", help="run directory (default <output:dir>/<name>)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default: <out>/checkpoint.pt); its config is used, "
                        "overrides apply on top")
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
        "Certify a smoothed classifier (Cohen et al.'s CERTIFY: N0 selection and N estimation samples,\n"
        "Clopper-Pearson at alpha) with the parameters in certify_params, writing Cohen's TSV format.\n"
        "Needs robustkern.smoothing: exits 4 until it is available."))
    _add_common(p)
    p.add_argument("--checkpoint", help="base classifier weights")
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

    p = sub.add_parser("demo", help="a two-minute tour on scikit-learn's digits", formatter_class=raw,
                       epilog=EPILOG, description=(
        "Train a small CNN on scikit-learn's 8x8 digits (embedded, no download) with standard training,\n"
        "then with IBP certified training and report IBP-verified accuracy. Parts whose library pieces are\n"
        "missing are reported and make the exit code 4."))
    _add_common(p, config=False, data=False)
    p.add_argument("--out", "-o", help="where to put the runs (default a new temporary folder)")
    p.add_argument("--epochs", type=int, help="epochs per part (default: the recipes' 10 and 20)")
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
