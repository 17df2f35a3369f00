"""What every command-line entry point shares: ``--quiet`` and ``--verbose``, help texts that show the defaults,
and the exit-code rule. Bad input (`KinretInputError`) is one line naming the file and row, exit code 2 (with
``--verbose``, its traceback too); anything else is a bug and keeps its traceback (exit code 1)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from kinret.errors import KinretInputError
from kinret.log import setup_logging

log = logging.getLogger("kinret")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default after its help."""


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the kit's help format and ``--quiet``/``--verbose``."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    p.add_argument("--quiet", action="store_true", help="warnings and the final summary only, no progress bars")
    p.add_argument("--verbose", action="store_true", help="debug logging; an input error shows its traceback")
    return p


def run_command(body: Callable[[], int | None], args: argparse.Namespace) -> int:
    """Set up logging from ``--quiet``/``--verbose``, run `body`, and return its exit code (None counts as 0). A
    `KinretInputError` becomes one logged line and exit code 2; any other exception propagates with its traceback."""
    setup_logging(verbose=args.verbose, quiet=args.quiet)
    try:
        code = body()
    except KinretInputError as exc:
        if args.verbose:
            log.exception("input error")
        else:
            log.error("%s", exc)
        return 2
    return 0 if code is None else code
