"""The ``dfkd-bench`` command line.

Every user error (a wrong method name, a missing data folder, a corrupt
checkpoint ...) is a :class:`~dfkd_bench.errors.DfkdError` and is printed as
one ``error:`` line with exit status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING
import os
import statistics
import sys

from dfkd_bench.errors import ConfigError, DfkdError, bounded, quote, user_message

from dfkd_bench.store import DEFAULT_RESULTS_DIR

if TYPE_CHECKING:
    from dfkd_bench.cluster.experiment import RunRequest


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _int_csv(text: str) -> list[int]:
    items = [item.strip() for item in text.split(",")]  # an empty item ("1," or "0,,2") is an error, not skipped
    # ASCII digits only, as in --set values: int() would also read '٣' or '３' as 3.
    if not all(item.lstrip("+-").isascii() and item.lstrip("+-").isdigit() and len(item) <= 40 for item in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {quote(text)}")
    return [int(item) for item in items]


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, ``error: <what> (see dfkd-bench <command> --help)``,
    with exit status 2, like every other user error (no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        message = bounded(" ".join(message.split()))
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _leaf_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub-)parser of the command ``args`` was parsed for: its name goes into error lines."""
    while True:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            return parser
        chosen = getattr(args, actions[0].dest, None)
        if chosen not in actions[0].choices:
            return parser
        parser = actions[0].choices[chosen]


# ---------------------------------------------------------- validation ---
#
# Options are checked by their destination name, whichever sub-command declares them, so that a
# value out of range is one error line before anything runs or is written (not a traceback, a
# silently meaningless run, or a teacher trained for nothing).

def _check_int(args, name: str, low: int, high: int, flag: str, meaning: str) -> None:
    value = getattr(args, name, None)
    if value is not None and (not isinstance(value, int) or not low <= value <= high):
        raise ConfigError(f"{flag} must be {meaning}, got {value}")


def _check_device(name: str | None) -> None:
    from dfkd_bench.cluster.launch import check_device_name

    check_device_name(name)


def _check_writable_folder(folder, what: str, hint: str) -> None:
    """Create ``folder`` if needed and write a probe file into it; one error line if that fails."""
    import tempfile
    from pathlib import Path

    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"{what} {folder} cannot be written ({error.strerror or error}); {hint}") from None


# Folder and file options: an empty value would silently mean the current directory.
_PATH_OPTIONS = {"results_dir": "--results-dir", "out": "--out", "teacher_cache": "--teacher-cache",
                 "submitit_dir": "--submitit-dir", "teacher_checkpoint": "--teacher-checkpoint"}


def _check_paths(args: argparse.Namespace) -> None:
    for name, flag in _PATH_OPTIONS.items():
        value = getattr(args, name, None)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and not item.strip():
                raise ConfigError(f"{flag} is empty; pass a path (. for the current folder)")


def validate_args(args: argparse.Namespace) -> None:
    """Every numeric and path option of every sub-command, in range, before the command runs."""
    from dfkd_bench.cluster.experiment import SEED_LIMIT, check_image_size, check_seeds

    _check_paths(args)

    if getattr(args, "seeds", None) is not None:
        check_seeds(args.seeds)
    _check_int(args, "seed", 0, SEED_LIMIT - 1, "--seed", f"an integer from 0 to {SEED_LIMIT - 1}")
    check_image_size(getattr(args, "image_size", None))
    _check_int(args, "epochs", 1, 10**6, "--epochs", "a positive number of epochs (at most 10^6)")
    _check_int(args, "batch_size", 1, 2**31 - 1, "--batch-size", "a positive integer")
    lr = getattr(args, "lr", None)
    if lr is not None and not (lr > 0 and lr < float("inf")):
        raise ConfigError(f"--lr must be a finite number > 0, got {lr}")
    from dfkd_bench.cluster.launch import LAUNCH_INT_RANGES, check_launch_option

    # The launch options: the same checks as an experiment file's [resources] (launch.check_launch_option).
    for name in (*LAUNCH_INT_RANGES, "mem_gb"):
        if name != "runs_per_gpu":  # checked with the file's value merged in (launch.launch_options)
            check_launch_option(name, getattr(args, name, None))
    _check_int(args, "iterations", 1, 10**6, "--iterations", "a positive integer")
    _check_int(args, "warmup", 0, 10**6, "--warmup", "an integer >= 0")
    _check_device(getattr(args, "device", None))

    if getattr(args, "teacher_mean", None) is not None or getattr(args, "teacher_std", None) is not None:
        from dfkd_bench.data.catalog import get_dataset_info
        from dfkd_bench.cluster.experiment import check_teacher_normalisation
        from dfkd_bench.teachers.loading import parse_floats

        mean = parse_floats(args.teacher_mean, "--teacher-mean")
        std = parse_floats(args.teacher_std, "--teacher-std")
        dataset = getattr(args, "dataset", None) or "digits"
        check_teacher_normalisation(mean, std, get_dataset_info(dataset).channels,
                                    getattr(args, "teacher_checkpoint", None), dataset,
                                    weights=getattr(args, "teacher_weights", None),
                                    arch=getattr(args, "teacher_arch", None))
    checkpoint = getattr(args, "teacher_checkpoint", None)
    if checkpoint is not None and os.path.isfile(checkpoint):
        from dfkd_bench.cluster.experiment import check_teacher_weights

        check_teacher_weights(checkpoint)

    if getattr(args, "command", None) == "teacher" and getattr(args, "teacher_command", None) == "train":
        # Last, so that a bad option is reported without touching the disk: a cache that cannot
        # be written fails now, not after the whole teacher has been trained.
        from dfkd_bench.data.catalog import get_dataset_info
        from dfkd_bench.cluster.experiment import check_model_name
        from dfkd_bench.teachers.loading import teacher_cache_dir

        get_dataset_info(args.dataset)
        check_model_name(args.arch, "--arch")
        _check_writable_folder(args.teacher_cache or teacher_cache_dir(), "teacher cache",
                               "pass --teacher-cache DIR (or set $DFKD_BENCH_TEACHERS) to a folder you can write")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", default=os.environ.get("DFKD_BENCH_DATA"),
                        help="folder holding the dataset (default: $DFKD_BENCH_DATA); not needed for digits")
    parser.add_argument("--download", action="store_true",
                        help="let torchvision download the dataset into --data-root (needs internet; never used in tests)")


def _add_teacher_args(parser: argparse.ArgumentParser, arch_required: bool = False) -> None:
    parser.add_argument("--teacher-arch", required=arch_required, help="teacher architecture (default: the preset's)")
    parser.add_argument("--teacher-checkpoint", metavar="PATH",
                        help="external teacher weights (.pt/.pth/.th or .safetensors): a state_dict, or a dict "
                             "holding one under 'state_dict'/'model'/'net' beside other entries; 'module.' is "
                             "stripped, old BatchNorm files and the known key names of public checkpoints of "
                             "the architecture are handled; loaded with weights_only=True")
    parser.add_argument("--teacher-key-map", action="append", metavar="OLD_PREFIX=NEW_PREFIX",
                        help="rename the checkpoint's keys starting with OLD_PREFIX (e.g. linear.=fc., "
                             "backbone.= drops a prefix); repeatable, applied in order")
    parser.add_argument("--teacher-weights", metavar="WHICH",
                        help="published weights by name: torchvision (the architecture's default weights, "
                             "read from the torch hub cache $TORCH_HOME/hub/checkpoints, fetched there only "
                             "with --download), torchvision:<WEIGHTS>, or cache (the teacher cache); "
                             "default: torchvision for imagenet's alexnet, else cache")
    parser.add_argument("--teacher-mean", metavar="M1,M2,M3",
                        help="input mean the external teacher was trained with (default: the dataset's)")
    parser.add_argument("--teacher-std", metavar="S1,S2,S3",
                        help="input std the external teacher was trained with (default: the dataset's)")
    parser.add_argument("--teacher-cache", metavar="DIR",
                        help="teacher cache folder (default: $DFKD_BENCH_TEACHERS or ~/.cache/dfkd-bench/teachers)")


def _add_launch_args(parser: argparse.ArgumentParser) -> None:
    from dfkd_bench.cluster.launch import add_launcher_arguments

    add_launcher_arguments(parser)  # with --tensorboard, for run and sweep alike


# -------------------------------------------------------------------- run ---

def _request_from_args(args) -> "RunRequest":
    from dfkd_bench.config import parse_overrides
    from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions
    from dfkd_bench.teachers.loading import parse_floats

    return RunRequest(
        methods=_csv(args.methods), dataset=args.dataset, seeds=args.seeds, teacher_arch=args.teacher_arch,
        student_arch=args.student_arch, budget=args.budget, overrides=parse_overrides(args.set or []),
        teacher=TeacherOptions(checkpoint=args.teacher_checkpoint, mean=parse_floats(args.teacher_mean, "--teacher-mean"),
                               std=parse_floats(args.teacher_std, "--teacher-std"), cache_dir=args.teacher_cache,
                               key_map=list(args.teacher_key_map or []), weights=args.teacher_weights,
                               download=args.download),
        data_root=args.data_root, image_size=args.image_size, protocol=args.protocol,
    )


def print_summary(summaries: list[dict]) -> None:
    """A per-run table and a per-method mean +- std table."""
    if not summaries:
        return
    print()
    print(f"{'run':58s} {'final acc':>9s} {'best acc*':>9s} {'minutes':>8s}")
    for s in summaries:
        print(f"{s['run']:58s} {s['final_accuracy']:9.2f} {s['best_accuracy']:9.2f} {s['wall_time'] / 60:8.1f}")
    print()
    print(f"{'method':8s} {'dataset':10s} {'runs':>4s} {'final acc (mean ± std)':>24s} {'best acc* (mean ± std)':>24s}")
    groups: dict[tuple[str, str], list[dict]] = {}
    for s in summaries:
        groups.setdefault((s["method"], s["dataset"]), []).append(s)

    def fmt(values: list[float]) -> str:  # one run has no spread: show its value alone, not "± 0.00"
        if len(values) == 1:
            return f"{values[0]:.2f}"
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

    for (method, dataset), runs in groups.items():
        print(f"{method:8s} {dataset:10s} {len(runs):4d} {fmt([r['final_accuracy'] for r in runs]):>24s} "
              f"{fmt([r['best_accuracy'] for r in runs]):>24s}")
    teacher = summaries[0].get("teacher_accuracy")
    if teacher is not None:
        print(f"teacher test accuracy: {teacher:.2f}")
    print("* best accuracy is selected on the test set (an optimistic number); final accuracy is the honest one")


def cmd_run(args) -> int:
    from dfkd_bench.cluster.experiment import build_run_configs
    from dfkd_bench.cluster.launch import launch, results_hint

    from dfkd_bench.cluster.launch import check_work_bounds, check_work_size

    check_work_size(len(_csv(args.methods)) * len(args.seeds), args, "methods x seeds")
    configs = build_run_configs(_request_from_args(args))
    check_work_bounds(configs, args)
    summaries = launch(configs, args.results_dir, args)
    print_summary(summaries)
    if summaries:
        print(results_hint(args.results_dir, len(summaries)))
    return 0


# ---------------------------------------------------------------- teacher ---

def cmd_teacher_train(args) -> int:
    import signal as _signal

    from dfkd_bench.teachers.training import TeacherInterrupted, TeacherStop, train_teacher

    # Ctrl-C / SIGTERM: while the data are read, stop at once (nothing is lost); during the epochs,
    # finish the epoch, checkpoint it and stop; the same command resumes. A second Ctrl-C stops at once.
    stop = TeacherStop()

    def handler(signum, frame):
        if stop.requested and signum == _signal.SIGINT:
            raise KeyboardInterrupt
        stop.request(_signal.Signals(signum).name)
        if not stop.training:
            raise TeacherInterrupted(f"teacher training stopped by {stop.reason} while reading the data (nothing to "
                                     "save); run the same command again to start it")

    previous = {sig: _signal.signal(sig, handler) for sig in (_signal.SIGINT, _signal.SIGTERM)}
    try:
        result = train_teacher(args.dataset, args.arch, data_root=args.data_root, cache_dir=args.teacher_cache,
                               epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               device=args.device, workers=args.workers, download=args.download,
                               progress=not args.no_progress, recipe=args.recipe, pipeline=args.pipeline,
                               stop=stop)
    except TeacherInterrupted as stopped:
        print(str(stopped), file=sys.stderr)
        return 3  # stopped cleanly (as a stopped packed run's worker): not done, resumable
    finally:
        for sig, old_handler in previous.items():
            _signal.signal(sig, old_handler)
    data = ""
    if "data_seconds" in result:
        sources = ", ".join(f"{split} {how}" for split, how in result["tensor_cache"].items())
        data = f" (of which {result['data_seconds']:.0f} s loading the images: {sources})"
    print(f"teacher {args.dataset}/{args.arch} ({args.recipe} recipe, {result['pipeline']} pipeline): test accuracy "
          f"{result['test_accuracy']:.2f} % after {result['train_seconds']:.0f} s{data}; saved to {result['path']}")
    return 0


def cmd_teacher_eval(args) -> int:
    from torch.utils.data import DataLoader

    from dfkd_bench.data.catalog import get_dataset_info
    from dfkd_bench.data.loaders import build_dataset
    from dfkd_bench.runtime import resolve_device
    from dfkd_bench.presets import get_preset
    from dfkd_bench.teachers.loading import build_teacher, evaluate_classifier, parse_floats, resolve_teacher

    info = get_dataset_info(args.dataset)
    arch = args.teacher_arch or get_preset(args.dataset).teacher_arch
    image_size = args.image_size or get_preset(args.dataset).image_size
    spec = resolve_teacher(args.dataset, arch, checkpoint=args.teacher_checkpoint,
                           mean=parse_floats(args.teacher_mean, "--teacher-mean"),
                           std=parse_floats(args.teacher_std, "--teacher-std"), cache_dir=args.teacher_cache,
                           data_root=args.data_root, key_map=args.teacher_key_map, weights=args.teacher_weights,
                           download=args.download, image_size=image_size)
    device = resolve_device(args.device)
    teacher = build_teacher(spec, info.num_classes, info.channels, image_size, device)
    test_set = build_dataset(args.dataset, args.data_root, "test", image_size=image_size, download=args.download)
    loader = DataLoader(test_set, batch_size=256, num_workers=args.workers or 0)
    metrics = evaluate_classifier(teacher, loader, device, progress=not args.no_progress,
                                  desc=f"teacher {args.dataset}")
    print(f"teacher {arch} ({spec.path}) on the {args.dataset} test split: accuracy {metrics['accuracy']:.2f} %, "
          f"cross-entropy {metrics['cross_entropy']:.4f}, {metrics['samples']} images")
    return 0


# ------------------------------------------------------------------- list ---

def cmd_list(args) -> int:
    if args.card:
        from dfkd_bench.cluster.protocol_card import render_card

        print(render_card(args.card, args.dataset))
        return 0
    if args.methods is not None or (args.settings and args.dataset):
        from dfkd_bench.config import parse_overrides
        from dfkd_bench.method_api import get_method
        from dfkd_bench.cluster.protocol_card import render_resolved

        if not (args.settings and args.methods and args.dataset):
            raise ConfigError("the values a method receives are listed by --settings --methods M --dataset D "
                              "(e.g. dfkd-bench list --settings --methods mad --dataset digits)")
        methods = [name.strip() for name in args.methods.split(",") if name.strip()]
        for name in methods:
            get_method(name)  # an unknown method is one line
        print(render_resolved(methods, args.dataset, args.protocol, args.budget, parse_overrides(args.set or [])))
        return 0
    if args.dataset:
        raise ConfigError("--dataset goes with --card METHOD (e.g. dfkd-bench list --card dafl --dataset mnist) "
                          "or with --settings --methods M")
    from dfkd_bench.config import TrainConfig
    from dfkd_bench.data.catalog import list_datasets
    from dfkd_bench.method_api import list_methods, param_fields
    from dfkd_bench.models import list_generators, list_models
    from dfkd_bench.presets import PRESETS

    print("methods:")
    for name, method in list_methods().items():
        print(f"  {name:12s} {method.summary}")
    print("\ndatasets (preset teacher -> student):")
    for info in list_datasets():
        preset = PRESETS.get(info.name)
        pair = f"{preset.teacher_arch} -> {preset.student_arch}" if preset else ""
        print(f"  {info.name:13s} {info.num_classes:5d} classes  {info.channels}x{info.image_size}x{info.image_size}"
              f"  {pair}")
    print("\nmodels (also timm:<name> and torchvision:<name>):")
    for info in list_models():
        print(f"  {info.name:13s} {info.family:14s} {info.description}")
    print("\ngenerators:")
    for info in list_generators():
        print(f"  {info.name:13s} {info.description}")
    if args.settings:
        print("\nengine settings (--set key=value; paper symbol in brackets; defaults before a dataset's preset):")
        engine_defaults = TrainConfig()
        for f in dataclasses.fields(TrainConfig):
            paper = f" [{f.metadata['paper']}]" if f.metadata.get("paper") else ""
            default = getattr(engine_defaults, f.name)
            default = ",".join(str(v) for v in default) if isinstance(default, list) else str(default).lower() \
                if isinstance(default, bool) else str(default)
            print(f"  {f.name:22s} = {default:8s} {f.metadata.get('doc', '')}{paper}")
        for name, method in list_methods().items():
            print(f"\n{name} settings:")
            defaults = method.Params()
            for field_name, f in param_fields(method).items():
                paper = f" [{f.metadata['paper']}]" if f.metadata.get("paper") else ""
                print(f"  {field_name:22s} = {getattr(defaults, field_name)!s:8s} {f.metadata.get('doc', '')}{paper}")
            for preset_name, values in sorted(method.preset_params.items()):
                shown = ", ".join(f"{key}={value}" for key, value in values.items())
                print(f"  on the {preset_name} preset: {shown}")
    return 0


# ------------------------------------------------------------------ parser ---

def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="dfkd-bench",
        description="Benchmark data-free knowledge distillation methods (ABM, DFKD-Mem, MAD, ...) "
                    "under identical settings.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="distil: run every (method, seed) under the same settings",
                         description="Run every (method, seed) on a dataset under identical settings, "
                                     "skipping runs already done, and print a summary table.")
    run.add_argument("--methods", default="abm,mem,mad", help="comma-separated method names (default: abm,mem,mad)")
    run.add_argument("--dataset", default="digits", help="dataset name (default: digits, the embedded offline set)")
    run.add_argument("--student-arch", help="student architecture (default: the preset's)")
    run.add_argument("--seeds", type=_int_csv, default=[0], help="comma-separated seeds (default: 0)")
    run.add_argument("--budget", choices=["smoke", "default", "paper"], default="default",
                     help="smoke: a few steps (tests); default: the preset's budget; paper: the MAD paper's ep x spe "
                          "(on digits/mnist its CIFAR schedule; a method's own paper protocol is --protocol paper)")
    run.add_argument("--protocol", choices=["common", "paper"], default="common",
                     help="common: the preset's protocol, one for every method (default); paper: each method's own "
                          "paper protocol on the dataset (`dfkd-bench list --card METHOD` shows it)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a setting, e.g. --set student_steps=30 --set alpha=0.99 "
                          "(paper symbols like lambda3, n_S, alpha work; `dfkd-bench list --settings` lists all)")
    run.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR, help=f"where run folders go (default: {DEFAULT_RESULTS_DIR})")
    run.add_argument("--image-size", type=int, help="override the preset's image size")
    _add_data_args(run)
    _add_teacher_args(run)
    _add_launch_args(run)
    run.set_defaults(func=cmd_run)

    teacher = sub.add_parser("teacher", help="train or evaluate teachers")
    teacher_sub = teacher.add_subparsers(dest="teacher_command", metavar="ACTION")
    train = teacher_sub.add_parser("train", help="train a teacher with the preset's recipe (Table 4) into the cache")
    train.add_argument("--dataset", required=True, help="dataset name")
    train.add_argument("--arch", required=True, help="teacher architecture, e.g. lenet5, wrn40_2, resnet34")
    train.add_argument("--recipe", default="paper", choices=("paper", "fast"),
                       help="paper: the preset's recipe (Table 4; default); fast: a short one-cycle recipe for "
                            "CIFAR (40 epochs, batch 512; target >= 93 %% on JPEG CIFAR-10 in <= 4 min on an H200)")
    train.add_argument("--pipeline", default="auto", choices=("auto", "tensors", "loader"),
                       help="tensors: whole splits in device memory, device-side augmentation, decoded images "
                            "cached in TEACHER_CACHE/tensors; loader: DataLoader processes; auto (default): "
                            "tensors for digits, MNIST, CIFAR, Tiny-ImageNet")
    train.add_argument("--epochs", type=int, help="override the recipe's epochs (milestones scale along)")
    train.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    train.add_argument("--lr", type=float, help="override the recipe's learning rate")
    train.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    train.add_argument("--workers", type=int, help="data-loading processes (default: cores - 1, at most 8)")
    train.add_argument("--teacher-cache", metavar="DIR", help="teacher cache folder")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    _add_data_args(train)
    train.set_defaults(func=cmd_teacher_train)
    evaluate = teacher_sub.add_parser("eval", help="print a teacher's test accuracy (cached or --teacher-checkpoint)")
    evaluate.add_argument("--dataset", required=True, help="dataset name")
    evaluate.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    evaluate.add_argument("--workers", type=int, default=0, help="data-loading processes (default: 0)")
    evaluate.add_argument("--image-size", type=int, help="override the preset's image size")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    _add_teacher_args(evaluate)
    _add_data_args(evaluate)
    evaluate.set_defaults(func=cmd_teacher_eval)
    teacher.set_defaults(func=lambda args: (teacher.print_help(), 2)[1])

    listing = sub.add_parser("list", help="print the registered methods, datasets, models and generators")
    listing.add_argument("--settings", action="store_true", help="also list every setting with its default")
    listing.add_argument("--card", metavar="METHOD", help="print METHOD's protocol card: each setting of its paper "
                                                          "protocol with the paper's / official code's value and ours")
    listing.add_argument("--dataset", help="with --card: only this dataset's paper protocol; with --settings "
                                           "--methods M: the values M receives on this dataset")
    listing.add_argument("--methods", help="with --settings --dataset D: comma-separated methods whose settings are "
                                           "listed as a run receives them (after preset, protocol, budget, --set), "
                                           "each with the layer that set it")
    listing.add_argument("--protocol", choices=["common", "paper"], default="common",
                         help="with --settings --methods: the protocol (default common)")
    listing.add_argument("--budget", choices=["smoke", "default", "paper"], default="default",
                         help="with --settings --methods: the budget (default: default)")
    listing.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="with --settings --methods: an override, as for run")
    listing.set_defaults(func=cmd_list)

    from dfkd_bench.bench.benchmark import add_bench_command
    from dfkd_bench.report import add_report_command
    from dfkd_bench.report.method_docs import add_docs_command
    from dfkd_bench.cluster.sweep import add_status_command, add_sweep_command

    add_sweep_command(sub)
    add_status_command(sub)
    add_report_command(sub)
    add_bench_command(sub)
    add_docs_command(sub)

    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`dfkd-bench list | head`): stop quietly, as Unix tools do. Later
        # writes (the interpreter's final flush) go to /dev/null instead of raising again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests)
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    leaf = _leaf_parser(parser, args)
    if extra:
        leaf.error(f"unrecognized arguments: {' '.join(extra)}")
    for action in leaf._actions:  # argparse turns `--option=--` into an empty list instead of an error
        if (isinstance(action, argparse._StoreAction) and action.nargs is None and action.type is not _int_csv
                and isinstance(getattr(args, action.dest, None), list)):
            leaf.error(f"argument {'/'.join(action.option_strings) or action.dest}: expected one value")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        validate_args(args)
        return int(args.func(args) or 0)
    except DfkdError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a folder or file the user named cannot be read or written
        if args.debug or isinstance(error, BrokenPipeError):
            raise
        print(f"error: {user_message(error)} (--debug shows where)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
