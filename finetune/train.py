"""Entry point of one fine-tuning process: ``python -m finetune.train`` (what ``torchrun`` starts).

    torchrun --standalone --nproc_per_node=2 -m finetune.train photos/ --backbone resnet50 \\
        --name antsbees --mode full --epochs 10
    python -m finetune.train --config run.json --report-out report.json

Options are the fields of :class:`finetune.config.FinetuneConfig` (``--val-dir``, ``--freeze-epochs``...),
or one JSON file of them (``--config``: how ``backbones finetune --nproc-per-node`` hands its options
to every process). Only rank 0 registers the new version and writes the report (JSON on stdout,
or to ``--report-out``); errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from .config import FinetuneConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", help="ImageFolder or CSV manifest (or give --config)")
    parser.add_argument("--config", type=Path, help="a JSON file of FinetuneConfig fields")
    parser.add_argument("--report-out", type=Path, help="write the report JSON here instead of stdout")
    parser.add_argument("--home", type=Path, help="registry root (default: BENTOML_HOME)")
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr (rank 0)")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    for name, field in FinetuneConfig.model_fields.items():
        if name == "data":
            continue
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=field.description
            )
        else:
            # values go to pydantic as strings; it converts and validates them like JSON input
            choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
            parser.add_argument(flag, dest=name, default=None, choices=choices, help=field.description)
    return parser


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    if args.config:
        return FinetuneConfig.model_validate_json(args.config.read_text())
    values = {k: v for k, v in vars(args).items() if k in FinetuneConfig.model_fields and v is not None}
    return FinetuneConfig.model_validate(values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValidationError as e:
        parser.error(str(e).replace("\n", " "))
    except Exception as e:  # a bad name or alias (RegistryError), an unreadable --config
        print(f"error: {e}", file=sys.stderr)
        return 1

    from models import BackbonesError, Registry

    from .distributed import process_group
    from .pipeline import finetune

    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        with process_group(config.device) as ctx:
            if not ctx.is_main:  # the same warnings would come once per process
                logging.getLogger().setLevel(logging.ERROR)
            registry = Registry(args.home) if args.home else None
            result = finetune(config, registry=registry, ctx=ctx, progress=args.progress and ctx.is_main)
    except BackbonesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if ctx.is_main:
        text = json.dumps(result.report, default=str)
        if args.report_out:
            args.report_out.write_text(text)
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
