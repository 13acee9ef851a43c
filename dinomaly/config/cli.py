"""The command line every entry point shares: one definition per flag, the same help text everywhere.

    parser = entry_parser(__doc__, flags=("config", "data", "output", "set", "workers", "gpu"), required=("data",),
                          help={"output": "folder for ..."}, deprecated={"--input": "data"})
    args = parser.parse_args(argv)          # args.debug is always there
    return run_job(check, run, debug=args.debug)

A pipeline names the VOCABULARY flags it takes; `help` adapts a flag's text where the pipeline's meaning
differs, `defaults` gives a default. A bad flag prints one line and exits 2. An old spelling in `deprecated`
still works for one release and says so on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from dinomaly.config.jobs import Config
from dinomaly.config.loader import apply_overrides, help_text, load_config

DEFAULT_OUTPUT_ROOT = Config.__dataclass_fields__["output_root"].default
# the vocabulary flags of a training job -> the config keys they set
TRAINING_KEYS = {"data": "data.root", "name": "name", "workers": "train.num_workers", "gpu": "train.use_gpu",
                 "storage_path": "output_root"}

MODEL_HELP = ("the model to read: a checkpoint folder, an s3:// prefix, models:/<name>/<version>, "
              "models:/<name>@<alias>, or official Dinomaly weights (.pth, with --config naming their architecture)")

# flag (dest) -> (argparse keywords, help); the order here is the order in --help
VOCABULARY: dict[str, tuple[dict[str, Any], str]] = {
    "config": ({"metavar": "PRESET"}, "YAML preset name in configs/ (demo, mvtec_uni, ...) or a path to one"),
    "data": ({"metavar": "URI"}, "the images: a .parquet manifest, a dataset layout root (folder) or an s3:// "
                                 "prefix (data.root)"),
    "name": ({}, "run name: Ray run, MLflow run and default output folder runs/<name> (name)"),
    "output": ({"metavar": "DIR"}, "folder that receives everything the run writes: checkpoint/, config.yaml, "
                                   "metrics.json and, unless --storage-path says otherwise, Ray's run folder "
                                   "<DIR>/<name>; a new folder is a new run (default runs/<name>)"),
    "set": ({"action": "append", "default": [], "metavar": "KEY=VALUE"},
            "config override, repeatable"),
    "storage_path": ({"metavar": "URI"}, "folder or s3:// prefix for Ray's run folders (checkpoints, state) "
                                         "<it>/<name> (output_root); default: the --output folder, else runs"),
    "resume": ({"action": "store_true"}, "continue the interrupted run of this name and output from its "
                                         "latest checkpoint"),
    "model": ({}, MODEL_HELP),
    "workers": ({"type": int, "metavar": "N"}, "Ray workers doing the work"),
    "gpu": ({"action": "store_const", "const": True}, "one GPU per worker"),
    "debug": ({"action": "store_true"}, "on an error, show the Python traceback too (default: one line)"),
}


# the wording of --workers / --gpu for jobs scored by model actors (evaluate, predict, calibrate)
ACTOR_HELP = {"workers": "model actors scoring images (eval.actors)",
              "gpu": "one GPU per model actor (eval.gpus_per_actor=1)"}


class EntryParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and required flags that a deprecated spelling may also fill."""

    def __init__(self, *args: Any, required: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.required_flags = tuple(required)

    def format_usage(self) -> str:
        return self._with_required_shown(super().format_usage)

    def format_help(self) -> str:
        return self._with_required_shown(super().format_help)

    def _with_required_shown(self, format_text: Any) -> str:
        # parse_args checks the required flags itself (a deprecated spelling may fill one, which argparse's own
        # check would miss), so they are marked required only while the usage line is written: no [brackets]
        shown = [action for action in self._actions if action.dest in self.required_flags and action.option_strings]
        for action in shown:
            action.required = True
        try:
            return format_text()
        finally:
            for action in shown:
                action.required = False

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        parsed = super().parse_args(argv, namespace)
        for action in self._actions:  # an old spelling beside the new one: one would silently win
            if isinstance(action, _Deprecated):
                new = flag_name(action.dest)
                old = [a for a in argv if a.split("=", 1)[0] in action.option_strings]
                if old and any(a.split("=", 1)[0] == new for a in argv):
                    self.error(f"{old[0].split('=', 1)[0]} and {new} are the same option; give {new} once")
        missing = [flag_name(dest) for dest in self.required_flags if getattr(parsed, dest, None) is None]
        if missing:
            self.error(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
        return parsed


class _Deprecated(argparse.Action):
    """An old spelling: stores into the new flag's dest and warns once on stderr."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        new = flag_name(self.dest)
        print(f"warning: {option_string} is deprecated and goes away in the next release; use {new}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def entry_parser(doc: str | None, *, flags: Iterable[str], required: Iterable[str] = (),
                 help: Mapping[str, str] | None = None, defaults: Mapping[str, Any] | None = None,
                 deprecated: Mapping[str, str] | None = None, set_example: str = "",
                 keys: bool | Iterable[str] = True) -> EntryParser:
    """A parser with the named VOCABULARY flags (and --debug) in one order and wording.

    help: this pipeline's text for a flag whose meaning differs here; defaults: flag -> default;
    deprecated: old option string -> the flag it now spells; set_example: appended to --set's help;
    keys: the config keys listed with their meaning after the flags: True every one, or the sections and keys
    the job reads (see help_text), False none. Add pipeline-only flags after it.
    """
    wanted, help, defaults = {*flags, "debug"}, dict(help or {}), dict(defaults or {})
    unknown = wanted - VOCABULARY.keys()
    if unknown:
        raise ValueError(f"not vocabulary flags: {sorted(unknown)}; add them with parser.add_argument")
    epilog = help_text(None if keys is True else keys) if keys else None
    parser = EntryParser(description=doc, epilog=epilog, required=required,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    for dest, (kwargs, text) in VOCABULARY.items():
        if dest not in wanted:
            continue
        text = help.get(dest, text)
        if dest == "set":
            text += (" (keys listed below)" if keys else "") + (f", e.g. {set_example}" if set_example else "")
        options = dict(kwargs, help=text, dest=dest)
        if dest in defaults:
            options["default"] = defaults[dest]
        parser.add_argument(flag_name(dest), **options)
    for old, dest in (deprecated or {}).items():
        parser.add_argument(old, dest=dest, action=_Deprecated, help=argparse.SUPPRESS,
                            **({"type": VOCABULARY[dest][0]["type"]} if "type" in VOCABULARY[dest][0] else {}))
    return parser


def vocabulary_of(parser: argparse.ArgumentParser) -> set[str]:
    """The VOCABULARY option strings a parser takes (deprecated spellings left out)."""
    names = {flag_name(dest) for dest in VOCABULARY}
    return {option for action in parser._actions if action.help != argparse.SUPPRESS
            for option in action.option_strings if option in names}


def at_least(minimum: int):
    """An argparse type: an integer >= minimum (argparse then names the flag in its one-line error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}; give a whole number >= {minimum}")
        return value

    parse.__name__ = "integer"  # argparse's 'invalid <name> value' wording, should it ever show
    return parse


def set_keys(overrides: Iterable[str]) -> set[str]:
    """The config keys a list of --set KEY=VALUE texts sets."""
    return {text.split("=", 1)[0].strip() for text in overrides}


def training_config(args: argparse.Namespace, keys: Mapping[str, str] | None = None) -> Config:
    """The config of a job that trains (train, tune): --config, --set, then the flags.

    keys: flag -> config key of this pipeline's own flags, on top of TRAINING_KEYS. --gpu also sets
    train.precision=bf16 unless --set names it. --output DIR holds Ray's run folders too (output_root = DIR)
    unless --storage-path or the config (a preset, --set output_root=...) already says where they go.
    """
    config = load_config(args.config, args.set)
    mapping = {**TRAINING_KEYS, **(keys or {})}
    overrides = {key: getattr(args, flag) for flag, key in mapping.items() if getattr(args, flag, None) is not None}
    flags = {key: flag for flag, key in mapping.items() if key in overrides}
    refuse_both(args.set, {flags[key]: key for key in overrides})
    if getattr(args, "gpu", None) and "train.precision" not in set_keys(args.set):
        overrides["train.precision"] = "bf16"
    output, storage = getattr(args, "output", None), getattr(args, "storage_path", None)
    if output and storage is None and config.output_root == DEFAULT_OUTPUT_ROOT:
        overrides["output_root"] = str(output)
    return apply_overrides(config, overrides)


def refuse_both(overrides: Iterable[str], flag_keys: Mapping[str, str]) -> None:
    """A flag and a --set of the config key it sets, both given: the flag would silently win."""
    given = set_keys(overrides)
    for flag, key in flag_keys.items():
        if key in given:
            raise ValueError(f"{flag_name(flag)} and --set {key}=... both set {key}; give one of them")


def actor_settings(args: argparse.Namespace) -> list[str]:
    """--set texts of a job scored by model actors (evaluate, predict, calibrate): the user's --set, then
    --workers as eval.actors and --gpu as eval.gpus_per_actor=1."""
    settings = list(args.set)
    refuse_both(settings, {flag: key for flag, key in (("workers", "eval.actors"), ("gpu", "eval.gpus_per_actor"))
                           if getattr(args, flag, None) is not None})
    if getattr(args, "workers", None) is not None:
        settings.append(f"eval.actors={args.workers}")
    if getattr(args, "gpu", None):
        settings.append("eval.gpus_per_actor=1")
    return settings


def local_output(value: str | None, hint: str = "") -> None:
    """Refuse a URI --output (s3://, gs://, file://) for a command that writes its files with local file APIs:
    pathlib would turn s3://bucket/x into a local folder s3:/bucket/x."""
    if value and "://" in str(value):
        raise ValueError(f"--output {value}: this command writes to a local folder only (a plain path, not an "
                         f"s3:// or other URI){hint}")


def start_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
