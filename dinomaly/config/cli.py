"""What every entry point's command line shares: its docstring on top, the config keys below, --config, --set."""

from __future__ import annotations

import argparse
import logging

from dinomaly.config.loader import help_text


def entry_parser(doc: str | None, *, config_help: str, set_example: str, config_default: str | None = None,
                 keys: bool = True, model: bool = False) -> argparse.ArgumentParser:
    """An ArgumentParser with --config (a preset name in configs/ or a YAML path) and repeatable --set KEY=VALUE;
    keys=True lists every config key with its meaning after the flags; model=True adds the required --model."""
    parser = argparse.ArgumentParser(description=doc, epilog=help_text() if keys else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=config_default, help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"config override, repeatable, e.g. {set_example}")
    if model:
        parser.add_argument("--model", required=True, help="the model to read: a checkpoint directory, an s3:// "
                            "prefix, models:/<name>/<version> or models:/<name>@<alias>, or an official .pth")
    return parser


def start_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
