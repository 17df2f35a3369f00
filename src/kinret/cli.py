"""What every command-line entry point shares: ``--quiet`` and ``--verbose``, help texts that show the defaults,
and the exit-code rule, each fault one line (with ``--verbose``, its traceback too):

- 2: bad input (`KinretInputError`), the line naming the file and row;
- 3: the machine failed the run (`ENVIRONMENT_EXIT`): the disk filled up (`kinret.io.DiskFullError`), the line naming
  the folder, what the write needed and what is free;
- 130: interrupted (Ctrl-C, SIGINT): worker processes stopped, the line saying what is kept and that the same command
  continues;
- 1: anything else is a bug of the kit and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from kinret.errors import KinretInputError
from kinret.io import DiskFullError, is_disk_full
from kinret.log import setup_logging

log = logging.getLogger("kinret")
INPUT_EXIT, ENVIRONMENT_EXIT, INTERRUPT_EXIT = 2, 3, 130
INTERRUPTED = ("interrupted: every finished file is kept (trained runs, checkpoints, caches, score matrices); run the "
               "same command again to continue from there")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default after its help, unless the help already says
    what the default is or there is none (None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the kit's help format and ``--quiet``/``--verbose``."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    p.add_argument("--quiet", action="store_true", help="warnings and the final summary only, no progress bars")
    p.add_argument("--verbose", action="store_true", help="debug logging; an input error shows its traceback")
    return p


def stop_workers() -> None:
    """End the worker processes joblib keeps for reuse (grid training, data generation), if any were started."""
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(loky, "_executor", None)  # the pool itself: get_reusable_executor() would start a new one
    if executor is not None:
        executor.shutdown(wait=False, kill_workers=True)


def _report(message: str, verbose: bool) -> None:
    if verbose:
        log.exception("%s", message)
    else:
        log.error("%s", message)


def run_command(body: Callable[[], int | None], args: argparse.Namespace,
                propagate: tuple[type[BaseException], ...] = ()) -> int:
    """Set up logging from ``--quiet``/``--verbose``, run `body`, and return its exit code (None counts as 0). A
    fault is one logged line and its exit code: bad input 2, a full disk 3, Ctrl-C 130 (after stopping the worker
    processes); any other exception propagates with its traceback, and so do the kinds in `propagate` (a command run
    inside another leaves a full disk and Ctrl-C to the outer one, which stops the whole run)."""
    setup_logging(verbose=args.verbose, quiet=args.quiet)
    try:
        code = body()
    except propagate:
        raise
    except KinretInputError as exc:
        _report(str(exc), args.verbose)
        return INPUT_EXIT
    except DiskFullError as exc:
        if not exc.reported:
            _report(str(exc), args.verbose)
        return ENVIRONMENT_EXIT
    except OSError as exc:  # a full disk outside the kit's own writers (a folder made, a library's file)
        if not is_disk_full(exc):
            raise
        where = Path(exc.filename) if exc.filename else None
        _report(str(DiskFullError(where.parent if where else Path("."), where.name if where else "")), args.verbose)
        return ENVIRONMENT_EXIT
    except KeyboardInterrupt:
        stop_workers()
        _report(INTERRUPTED, args.verbose)
        return INTERRUPT_EXIT
    return 0 if code is None else code
