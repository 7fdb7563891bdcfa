"""Command-line entry point: ``sensitune <command> ...``.

Thin by design: every sub-command lives in ``sensitune/commands/<name>.py`` and exposes
``register(subparsers)`` which adds its parser and sets ``func`` (a callable taking the parsed
arguments and returning an exit code). Commands are discovered, so adding one never edits this file.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import sensitune.commands as _commands


class CLIError(Exception):
    """An error caused by the user's input: printed without a traceback, exit code 2."""


class _NotRaised(Exception):
    """Stands in for an error class whose module was never imported (so it cannot have been raised)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors reported as one line with exit code 2: bad input, and training stopped on a
    non-finite loss or weight (a setting such as the lr is wrong; the message names the
    checkpoint kept). Looked up only if the trainer was imported, so ``sensitune tasks`` never
    imports torch."""
    trainer = sys.modules.get("sensitune.engine.trainer")
    non_finite = getattr(trainer, "NonFiniteLossError", _NotRaised)
    return (CLIError, FileNotFoundError, ValueError, KeyError, non_finite)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sensitune",
        description="Parameter-efficient fine-tuning of pretrained vision models that knows where to tune.",
    )
    from sensitune import __version__

    parser.add_argument("--version", action="version", version=f"sensitune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"sensitune.commands.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        # Errors raised for bad input carry a message written for the user.
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"sensitune {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
