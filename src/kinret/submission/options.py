"""What `make_submission.py`'s stages are given: one frozen options object built from the command line at its edge
(`options_from_args`), as the other stages take typed inputs (`EnsembleSettings`, `train_run(cfg, fold)`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from kinret.data import DEFAULT_ROOT
from kinret.data.synth import SynthConfig
from kinret.data.workspace import WorkDirs, work_dirs
from kinret.ensemble.cli import settings_from_args
from kinret.ensemble.settings import EnsembleSettings


@dataclass(frozen=True)
class Options:
    """A run of `make_submission.py`.

    data_root: the data folder given (None: the synthetic default, made from `synth`); regenerate: make it again
    dirs: the data set's runs, ensemble and submission folders, and where the machine's throughput record is
    settings: what the ensemble stage scores and how it chooses; zip_name: the zip's name (None: after the choice)
    jobs: training processes (None: the schedule's); dry_run, final_fit: as the options say
    quiet, verbose: the logging asked for (training workers get the same); argv: the command line, for run.json
    """

    data_root: Path | None
    synth: SynthConfig | None
    regenerate: bool
    dirs: WorkDirs
    settings: EnsembleSettings
    zip_name: str | None = None
    jobs: int | None = None
    dry_run: bool = False
    final_fit: bool = False
    quiet: bool = False
    verbose: bool = False
    argv: tuple[str, ...] = ()

    @property
    def root(self) -> Path:
        """The data folder the run reads: the one given, else the synthetic default's."""
        return DEFAULT_ROOT if self.data_root is None else self.data_root

    @property
    def synthetic(self) -> bool:
        return self.data_root is None


def options_from_args(args: argparse.Namespace, argv: list[str]) -> Options:
    """The options of a parsed `make_submission.py` command line: a folder given with --runs, --ensemble-dir or --out
    is that folder; the others are the data set's own (`kinret.data.workspace`)."""
    synth = SynthConfig(seed=args.data_seed) if args.data_root is None else None
    root = DEFAULT_ROOT if args.data_root is None else args.data_root
    dirs = work_dirs(root, synth, args.runs, args.ensemble_dir, args.out)
    settings = settings_from_args(args, root, None if args.data_root is not None else args.data_seed)
    return Options(args.data_root, synth, args.regenerate, dirs, settings, args.zip_name, args.jobs, args.dry_run,
                   args.final_fit, args.quiet, args.verbose, tuple(argv))
