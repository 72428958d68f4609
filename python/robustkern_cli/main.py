"""robustkern: train, evaluate, certify and analyse robust models from JSON recipes.

Every mistake is answered with one line on stderr. Exit codes: 0 ok, 1 any other failure (--traceback
shows its traceback), 2 usage or configuration error, 3 data missing or unreadable, 4 not available (an
optional package that is not installed, or something robustkern does not implement), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from robustkern import BackendUnavailable, cpu_malloc
from robustkern.bounds import UnsupportedLayerError
from robustkern.ops import interval_input_box

from . import __version__
from .config import CONFIG_DIR, list_configs, load_config
from .evaluate import fill_all_defaults
from .errors import (EXIT_DATA, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_NOT_AVAILABLE, EXIT_OK, EXIT_USAGE, ConfigError,
                     DataFormatError, DataMissingError, MissingDependency)

EPILOG = ("exit codes: 0 ok, 1 failure (--traceback shows it), 2 usage/config error, 3 data missing, 4 not "
          "available (an optional package, or not implemented), 130 interrupted")
# The environment variables robustkern reads: name -> what it does (README's table; `robustkern info` shows them).
ENVIRONMENT = {
    "ROBUSTKERN_BACKEND": "force one implementation of every op: auto|triton|cpp|cuda|reference (default auto)",
    "ROBUSTKERN_JIT": "0: never compile the C++ extension on first use (default: compile it when it is not built)",
    "ROBUSTKERN_DATA": "the data folder when --data-dir is not given (default ~/.robustkern/data)",
}
DEMO_TIME = "About 40-90 s on 2 CPU cores (measured from start to end: 38-53 s, 90 s on a busy machine)"
OVERRIDES_HELP = ("config overrides 'section:key=value', nested 'training_params:method_params:bound_type=interval'; "
                  "values are typed by the key's current value (floats may be fractions such as 8/255)")


def _err(msg: str) -> None:
    print(f"robustkern: {msg}", file=sys.stderr)


def _config_from(args, base_cfg=None) -> dict:
    if getattr(args, "config", None) is None and base_cfg is None:
        raise ConfigError("--config is required (a recipe name such as 'digits_standard' or a JSON path); "
                          f"recipes: {', '.join(list_configs())}")
    return load_config(getattr(args, "config", None) if base_cfg is None else None, args.overrides,
                       fill_defaults=fill_all_defaults, base_cfg=base_cfg)


def _progress(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _override_not_path(args, attr: str, without_path: str) -> None:
    """``--resume``/``--json`` take an optional path; ``--resume section:key=value`` means the flag without a
    path followed by an override (a value with ``=`` that is no existing file)."""
    value = getattr(args, attr)
    if value not in (None, without_path) and "=" in value and not Path(value).exists():
        args.overrides.insert(0, value)
        setattr(args, attr, without_path)


def _print_result(args, res: dict, line: str) -> None:
    """``line`` on stdout; with ``--json`` the JSON instead, with ``--json FILE`` the JSON into FILE as well."""
    if args.json == "-":
        print(json.dumps(res, default=str))
        return
    print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")


def _check_backend(device: str) -> None:
    """An explicit ROBUSTKERN_BACKEND must run on ``device``: tried on one small op before any work, so a bad
    value fails in a second with one line (robustkern.BackendUnavailable, exit 2)."""
    if os.environ.get("ROBUSTKERN_BACKEND", "").strip().lower() in ("", "auto"):
        return
    interval_input_box(torch.zeros(1, 1, device=device), 0.0)


# ----------------------------------------------------------------------------------------------- commands
def _resume_hint(run_dir: Path, args):
    def hint() -> str:
        ckpt = run_dir / "checkpoint.pt"
        if not ckpt.is_file():
            return f"no epoch had finished, so {run_dir} holds nothing to resume: start the run again"
        command = ["robustkern", "train", "--resume", str(ckpt)]
        if args.data_dir:
            command += ["--data-dir", args.data_dir]
        return f"the finished epochs are saved in {ckpt}; continue with: {shlex.join(command)}"
    return hint


def cmd_train(args) -> int:
    from .checkpoint import load_checkpoint
    from .train import default_run_dir, train
    resume = None
    _override_not_path(args, "resume", "auto")
    if args.resume is not None:
        if args.resume == "auto":
            if args.out is None and args.config is None:
                raise ConfigError("--resume without a path needs --out DIR or --config to find the run directory")
            run_dir = Path(args.out) if args.out else default_run_dir(_config_from(args))
            resume = run_dir / "checkpoint.pt"
        else:
            resume = Path(args.resume)
        ckpt = load_checkpoint(resume, args.trust_checkpoint)
        if args.config is not None and args.resume != "auto":
            _err(f"note: resuming uses the config stored in {resume}; --config is ignored (overrides apply)")
        cfg = _config_from(args, base_cfg=ckpt["config"])
        out = Path(args.out) if args.out else resume.parent
    else:
        cfg = _config_from(args)
        out = Path(args.out) if args.out else default_run_dir(cfg)
    if args.tensorboard is not None:  # kept in the checkpoint's config, so a resumed run logs on
        cfg["training_params"]["tensorboard"] = args.tensorboard
    args.interrupt_hint = _resume_hint(out, args)
    result = train(cfg, out, data_dir=args.data_dir, download=args.download, resume=resume, device=args.device,
                   progress=_progress(args), log=(lambda s: None) if args.quiet else None,
                   overwrite=args.overwrite, trust_checkpoint=args.trust_checkpoint)
    if result.rank == 0:
        print(json.dumps({"run_dir": str(result.run_dir), **result.final}, default=str))
    return EXIT_OK


def _checkpoint_config(path, trust: bool):
    """The content of the checkpoint ``path`` and the config it carries (ConfigError when it carries none)."""
    from .checkpoint import read_checkpoint
    obj = read_checkpoint(path, trust)
    base = obj.get("config") if isinstance(obj, dict) else None
    if base is None:
        raise ConfigError(f"{path} carries no config: pass --config naming the model and data set")
    return obj, base


def cmd_eval(args) -> int:
    from .evaluate import describe, evaluate
    _override_not_path(args, "json", "-")
    base = None
    if args.config is None and args.checkpoint:
        _, base = _checkpoint_config(args.checkpoint, args.trust_checkpoint)
    cfg = _config_from(args, base_cfg=base)
    res = evaluate(cfg, args.checkpoint, data_dir=args.data_dir, download=args.download, device=args.device,
                   progress=_progress(args), trust_checkpoint=args.trust_checkpoint)
    _print_result(args, res, describe(res))
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
    base = obj = None
    if args.config is None and args.checkpoint:
        obj, base = _checkpoint_config(args.checkpoint, args.trust_checkpoint)
    cfg = _config_from(args, base_cfg=base)
    p = certify_params(cfg)
    checkpoint = args.checkpoint or cfg["eval_params"]["checkpoint"] or None
    if not checkpoint:
        raise ConfigError("certify needs the base classifier's weights: --checkpoint FILE (or "
                          "eval_params:checkpoint=FILE)")
    radii = parse_radii(args.radii) if args.radii is not None else default_radii(p["sigma"])
    # checks the checkpoint before any data is loaded
    model = model_from_config(cfg, obj if obj is not None else checkpoint, args.trust_checkpoint)
    if args.outfile:
        outfile = Path(args.outfile)
    else:
        out_dir = Path(args.out) if args.out else Path(checkpoint).parent
        outfile = default_outfile(out_dir, p["sigma"])
    device = args.device
    if _maybe_init_distributed(device) and device.startswith("cuda"):
        device = f"cuda:{torch.cuda.current_device()}"
    args.interrupt_hint = lambda: (f"the images certified so far are kept in {outfile}: run the same command "
                                   "again to certify the rest")
    written = certify_checkpoint(cfg, model, outfile, data_dir=args.data_dir, download=args.download,
                                 device=device, progress=_progress(args), images_per_batch=args.images_per_batch,
                                 weights=checkpoint, overwrite=args.overwrite)
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
        sys.stdout.flush()  # the table first, whatever happens to the plot
        print(f"plot: {plot_curves(args.logs, args.plot, linf_dim=args.linf_dim)}", file=sys.stderr)
    return EXIT_OK


def cmd_bench(args) -> int:
    _override_not_path(args, "json", "-")
    from .data import dataset_info
    from .evaluate import model_from_config
    from .losses import StepState, training_loss
    from .train import build_optimizer
    cfg = _config_from(args)
    tp = cfg["training_params"]
    loss_fn = training_loss(tp["method"])
    info = dataset_info(cfg["data"]["dataset"])
    bs = args.batch_size or cfg["data"]["batch_size"]
    torch.manual_seed(cfg["seed"])
    model = model_from_config(cfg)
    model.to(args.device)
    x = torch.rand(bs, *info.shape, device=args.device)
    y = torch.randint(0, info.num_classes, (bs,), device=args.device)
    opt = build_optimizer(model.parameters(), tp)
    state = StepState(eps=float(tp["epsilon"]), max_eps=float(tp["epsilon"]))

    def step():
        loss, _ = loss_fn(model, x, y, cfg, state)
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
    threads = res["threads"]
    _print_result(args, res, (
        f"{cfg.get('name') or 'config'}: {res['method']} training step {res['train_step_ms']:.2f} ms "
        f"({res['train_samples_per_s']:.0f} samples/s), forward {res['forward_ms']:.2f} ms; {res['model']} "
        f"({res['params']:,} parameters), batch {bs}, {args.device}, {threads} thread{'s' if threads != 1 else ''}, "
        f"median of {args.steps}, synthetic data"))
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args, _progress(args))


def cmd_info(args) -> int:
    import robustkern
    from robustkern.models import MODEL_NAMES

    from .data import default_data_dir
    from .losses import LOSSES, NOT_IMPLEMENTED
    robustkern.info()  # versions, the compiled extension, the backend each device gets
    print(f"robustkern_cli {__version__}")
    print("environment:")
    width = max(len(k) for k in ENVIRONMENT)
    for name, what in ENVIRONMENT.items():
        print(f"  {name:<{width}}  {os.environ.get(name, '(unset)')!s:<10}  {what}")
    implemented = [m for m in sorted(LOSSES) if m not in NOT_IMPLEMENTED]
    pending = f"; not implemented yet (exit 4): {', '.join(sorted(NOT_IMPLEMENTED))}" if NOT_IMPLEMENTED else ""
    print("training methods: " + ", ".join(implemented) + pending)
    print("models: " + ", ".join(MODEL_NAMES))
    print(f"configs ({CONFIG_DIR}): " + ", ".join(list_configs()))
    print(f"data dir: {default_data_dir()}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------- parser
def _count(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _add_common(p: argparse.ArgumentParser, config: bool = True, data: bool = True) -> None:
    if config:
        p.add_argument("--config", "-c", help="recipe name in python/configs (e.g. digits_standard) or a JSON path")
        p.add_argument("overrides", nargs="*", metavar="section:key=value", help=OVERRIDES_HELP)
    if data:
        p.add_argument("--data-dir", help="folder with the data sets (default $ROBUSTKERN_DATA or "
                                          "~/.robustkern/data)")
        p.add_argument("--download", action="store_true", help="download a missing data set (never by default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--threads", type=_count(1), default=argparse.SUPPRESS,
                   help="torch CPU threads (on a small or shared machine 1 is often fastest)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or per-epoch lines")


def _add_trust(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that holds pickled Python objects beyond tensors and plain containers "
                        "(an older or foreign file); unpickling them can run code from the file, so only for "
                        "files whose origin you trust")


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="print the result as JSON instead of the readable line; with FILE, write the JSON there "
                        "(the line is still printed)")


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import EVALS
    from .losses import LOSSES
    parser = argparse.ArgumentParser(prog="robustkern", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"robustkern_cli {__version__}")
    parser.add_argument("--threads", type=_count(1), help="torch CPU threads (torch.set_num_threads)")
    sub = parser.add_subparsers(dest="command", metavar="command")
    raw = argparse.RawDescriptionHelpFormatter
    methods = ", ".join(LOSSES)

    p = sub.add_parser("train", help="train a model from a recipe", formatter_class=raw, epilog=EPILOG, description=(
        "Train the model of a JSON recipe with its method, training_params:method, one of:\n"
        f"  {methods}.\n"
        "'robustkern info' lists the methods not implemented yet; those exit 4. Every epoch writes\n"
        "<out>/checkpoint.pt (model, optimiser, config, epoch, metrics, RNG states, the method's own\n"
        "state such as BCP's and LMT's power iterates) and <out>/log.csv;\n"
        "--resume continues exactly where a run stopped. A folder that already holds a run is never\n"
        "overwritten unless --overwrite is given. Under torchrun the run is data-parallel\n"
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoint and log) instead of refusing")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="log the training scalars to DIR: TensorBoard event files when the tensorboard package is "
                        "installed, else DIR/scalars.csv (default training_params:tensorboard; '' = none)")
    _add_trust(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint", formatter_class=raw, epilog=EPILOG, description=(
        f"Evaluate a checkpoint on the test split with eval_params:method ({', '.join(EVALS)}): clean\n"
        "accuracy; ibp / crown_ibp: verified accuracy at eval_params:epsilon; pgd: accuracy under PGD-k\n"
        "with restarts; autoattack: APGD-CE then APGD-T (without FAB-T and Square: an upper bound on\n"
        "AutoAttack's accuracy); bcp / cap / lmt: the L2 table of Standard, PGD^100 and Verification\n"
        "accuracy, verified by that method's own certificate. Prints one readable line (--json: the\n"
        "metrics as JSON). A robustkern checkpoint carries its config, so --config may be left out;\n"
        "other checkpoints (Cohen, MACER, CROWN-IBP layouts) need one.\n\n"
        "examples:\n  robustkern eval --checkpoint runs/digits_standard/checkpoint.pt\n"
        "  robustkern eval -c cifar_crown_ibp_8_255 --checkpoint m.pth eval_params:epsilon=2/255\n"
        "  robustkern eval -c bcp_mnist_1.58 --checkpoint runs/bcp_mnist_1.58/checkpoint.pt"))
    _add_common(p)
    p.add_argument("--checkpoint", help="weights to evaluate (default eval_params:checkpoint)")
    _add_json(p)
    _add_trust(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("certify", help="randomised-smoothing certification", formatter_class=raw, epilog=EPILOG,
                       description=(
        "Certify the smoothed classifier of a checkpoint on the test split (Cohen et al.'s CERTIFY: N0\n"
        "selection and N estimation samples, Clopper-Pearson at alpha) with certify_params (sigma, N0, N,\n"
        "alpha, batch, skip, max), writing Cohen's TSV (idx label predict radius correct time; the radius\n"
        "in full, not rounded) to <out>/certify_sigma<sigma>.tsv (default <out>: the checkpoint's folder)\n"
        "and printing certified accuracy at radii 0, 0.25, ... and the ACR. The settings go to\n"
        "<outfile>.json. A rerun resumes: images already in the TSV are kept, if the TSV was made with the\n"
        "same sigma, N0, N, alpha, seed, data set and weights (else it refuses: use another --outfile, or\n"
        "--overwrite). Under torchrun the images are sharded over the ranks and rank 0 merges the log.\n\n"
        "examples:\n  robustkern certify --checkpoint runs/digits_gaussian/checkpoint.pt certify_params:N=1000\n"
        "  robustkern certify -c cohen_gaussian_0.25 --checkpoint noise_0.25/checkpoint.pth.tar --out logs\n"
        "  torchrun --nproc_per_node 4 -m robustkern_cli.main certify -c cohen_gaussian_0.25 --checkpoint m.pth"))
    _add_common(p)
    p.add_argument("--checkpoint", help="base classifier weights (default eval_params:checkpoint); a robustkern "
                                        "checkpoint carries its config, so --config may be left out")
    p.add_argument("--out", "-o", help="folder for the TSV (default: the checkpoint's folder)")
    p.add_argument("--outfile", help="the TSV path (default <out>/certify_sigma<sigma>.tsv)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard the results already in the TSV and start it afresh")
    p.add_argument("--radii", help="summary radii, start:stop:step or a comma list (default 0:max(1,4*sigma):0.25)")
    p.add_argument("--format", default="markdown", choices=("markdown", "tsv"), help="summary table format")
    p.add_argument("--images-per-batch", type=_count(1),
                   help="images whose noisy copies share a forward (default max(1, batch // N), at most 64)")
    _add_trust(p)
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("analyze", help="certified accuracy and ACR from certify logs", formatter_class=raw,
                       epilog=EPILOG, description=(
        "Summarise certification logs in Cohen et al.'s TSV format (idx label predict radius correct time):\n"
        "certified accuracy at each radius, abstention rate and average certified radius (ACR), one row per\n"
        "log labelled by its run (folder, method, sigma, N); optionally plot the curves (needs matplotlib).\n"
        "Logs of Cohen's certify.py round radii to 3 digits, to the nearest: counts at a radius within half a\n"
        "unit of the third digit may be too high; robustkern's own logs hold the radii in full.\n\nexample:\n"
        "  robustkern analyze out/sigma_0.25.tsv out/sigma_0.5.tsv --radii 0:2:0.25 --plot curves.png"))
    p.add_argument("logs", nargs="+", help="certification log files")
    p.add_argument("--radii", default="0:2.25:0.25", help="start:stop:step or a comma list (default 0:2.25:0.25)")
    p.add_argument("--format", default="markdown", choices=("markdown", "tsv"))
    p.add_argument("--plot", metavar="FILE", help="save certified-accuracy curves to FILE (.png/.pdf/.svg)")
    p.add_argument("--linf-dim", type=_count(0), default=0,
                   help="read L2 radii as L-inf radii: divide by sqrt(DIM) (TRADES+RS: 3072 for CIFAR)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("bench", help="time a recipe's training step and forward pass", formatter_class=raw,
                       epilog=EPILOG, description=(
        "Time one training step (the recipe's method: loss, backward, optimiser step) and one forward pass\n"
        "of its model on a synthetic batch of the data set's shape (no data files needed); prints the median\n"
        "over --steps runs as one readable line (--json: as JSON). Methods not implemented yet exit 4.\n\n"
        "example:\n  robustkern bench -c cifar_crown_ibp_8_255 --batch-size 64 --steps 5"))
    _add_common(p, data=False)
    p.add_argument("--batch-size", type=_count(1), help="batch size (default data:batch_size)")
    p.add_argument("--steps", type=_count(1), default=5, help="timed repetitions (default 5)")
    p.add_argument("--warmup", type=_count(0), default=1, help="untimed repetitions first (default 1)")
    _add_json(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="a short tour on scikit-learn's digits", formatter_class=raw,
                       epilog=EPILOG, description=(
        "Train a small CNN on scikit-learn's 8x8 digits (embedded, no download) three ways: standard\n"
        "training, IBP certified training and Gaussian noise augmentation; certify a subset of the test set\n"
        "with randomised smoothing; then print one table: clean accuracy, PGD accuracy (L-inf eps of the IBP\n"
        "recipe), IBP-verified accuracy and smoothing certified accuracy at L2 radii 0.25/0.5/0.75 with the\n"
        f"ACR (Gaussian model), and save <out>/certified_accuracy.png. {DEMO_TIME}.\n"
        "Needs scikit-learn (the data set) and, for the plot, matplotlib: pip install -e '.[data,plots]'."))
    _add_common(p, config=False, data=False)
    p.add_argument("--out", "-o", help="where to put the runs (default a new temporary folder)")
    p.add_argument("--overwrite", action="store_true", help="replace the demo's runs already in --out")
    p.add_argument("--epochs", type=_count(1), help="epochs per part (default: the recipes' 10, 20 and 10)")
    p.add_argument("--certify-images", type=_count(1), default=100, help="test images to certify (default 100)")
    p.add_argument("--certify-n", type=_count(1), default=10000,
                   help="smoothing estimation samples N (default 10000: with alpha 0.001 the largest certifiable "
                        "radius is 3.2 sigma = 0.8; N = 1000 stops at 0.62)")
    p.add_argument("--pgd-steps", type=_count(1), default=20, help="PGD steps (default 20)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="versions, backends, environment, models, recipes", formatter_class=raw,
                       epilog=EPILOG, description=(
        "Print robustkern.info() (versions, the compiled extension, the backend each device gets), the\n"
        "environment variables robustkern reads (ROBUSTKERN_BACKEND, ROBUSTKERN_JIT, ROBUSTKERN_DATA) with\n"
        "their values, and the app's methods, models and recipes."))
    p.set_defaults(func=cmd_info)
    for p in [parser, *sub.choices.values()]:
        _add_process_options(p, argparse.SUPPRESS if p is not parser else None)
    return parser


def _add_process_options(p: argparse.ArgumentParser, default) -> None:
    """Options of the whole process, accepted before and after the command (``default`` SUPPRESS on the
    commands, so that a value given before the command is kept)."""
    p.add_argument("--traceback", action="store_true", default=default if default is not None else False,
                   help="on an unexpected failure (exit 1), show the Python traceback instead of one line")
    p.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                   default=default if default is not None else True,
                   help="let glibc return freed memory to the system (by default the command keeps it for reuse, "
                        "robustkern.cpu_malloc.keep_freed_memory: steps 3-25%% faster on the CPU, the process keeps "
                        "its peak heap)")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # overrides may come after options too ("--out DIR section:key=value"), which argparse leaves over
        stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        if extra:
            args.overrides += extra
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:  # every step allocates the same sizes: no page faults once the heap has settled
        cpu_malloc.keep_freed_memory()
    try:
        if hasattr(args, "device"):  # not for info, which reports the backends, nor analyze
            _check_backend(args.device)
        return int(args.func(args) or EXIT_OK)
    except (ConfigError, BackendUnavailable) as exc:
        _err(f"error: {_one_line(exc)}")
        return EXIT_USAGE
    except (DataMissingError, DataFormatError) as exc:
        _err(f"data: {_one_line(exc)}")
        return EXIT_DATA
    except (MissingDependency, NotImplementedError, UnsupportedLayerError) as exc:
        _err(f"not available: {_one_line(exc) if str(exc) else 'not implemented in robustkern'}")
        return EXIT_NOT_AVAILABLE
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", None)
        _err("interrupted" + (f": {hint()}" if hint else ""))
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - anything else: one line, the traceback on request
        if args.traceback:
            raise
        _err(f"error: {type(exc).__name__}: {_one_line(exc)} (--traceback shows the traceback)")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
