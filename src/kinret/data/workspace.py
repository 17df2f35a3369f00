"""Where a data set's work lives: one folder per data folder under ``runs/``, ``ensemble/`` and ``submissions/``, so
that using another data folder in the same place overwrites and retrains nothing, and going back to a data set finds
what it had. Every command (``make_submission.py``, ``kinret.train``, ``kinret.grid``, ``kinret.ensemble``) asks this
module, so they agree on where a data set's runs, caches, score matrices, tables and submissions are.

The folder's name says which data it holds:
- the embedded default (``data/synthetic``) is ``synthetic``; made with another seed ``synthetic-seed1``, with other
  settings (``KINRET_SYNTH``, ``python -m kinret.synth`` options) ``synthetic-<6 hex digits of its config>``;
- any other data folder is its own name and the first 6 hex digits of the SHA-1 of its absolute, resolved path
  (``small-3fa2c1``, ``rfiw2020-9b0e11``): two folders of one name never share work, and the same folder, however it
  is spelt (relative, absolute, through a link), always finds its own. A moved or copied folder is another data set;
  ``--runs``/``--ensemble-dir`` point a run at the earlier work.

A data set whose content changed in place keeps its folder: its runs see the change themselves (``data.json``) and are
trained again. Folders given on the command line (``--runs``, ``--ensemble-dir``, ``--out``, ``--set out_root=``) are
used exactly as given, without a data-set subfolder: the user who names a folder has chosen where the work goes (a
notebook's ``submissions/notebook/``, a script that reads ``--out DIR/predictions.csv``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from kinret.data import DEFAULT_ROOT

RUNS, ENSEMBLE, SUBMISSIONS = Path("runs"), Path("ensemble"), Path("submissions")
SYNTH_CONFIG = "synth_config.json"  # what `kinret.data.synth.generate` records in the folder it makes


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:6]


def _clean(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "data"


def is_default(root: str | Path) -> bool:
    """Whether `root` is the embedded default's folder (``data/synthetic`` under the working folder)."""
    return Path(root).resolve() == DEFAULT_ROOT.resolve()


def synth_fields(root: str | Path) -> dict | None:
    """The settings a synthetic data folder was made from (its ``synth_config.json``); None for other data."""
    try:
        found = json.loads((Path(root) / SYNTH_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _synthetic_name(fields: dict) -> str:
    from kinret.data.synth import SynthConfig  # the generator's defaults, only when naming the default's folder

    default = dataclasses.asdict(SynthConfig())
    if fields == default:
        return "synthetic"
    if {k: v for k, v in fields.items() if k != "seed"} == {k: v for k, v in default.items() if k != "seed"}:
        return f"synthetic-seed{fields.get('seed')}"
    return f"synthetic-{_digest(json.dumps(fields, sort_keys=True))}"


def dataset_name(root: str | Path, synth: object | None = None) -> str:
    """The name of the data set's folders (see the module docstring). `synth`: the `SynthConfig` the default's
    folder is about to be made from (a run with ``--data-seed``), which names it before it exists."""
    root = Path(root)
    if is_default(root):
        fields = dataclasses.asdict(synth) if synth is not None else synth_fields(root)
        if fields is not None:
            return _synthetic_name(fields)
        if not root.exists():
            return "synthetic"
    return f"{_clean(root.resolve().name)}-{_digest(str(root.resolve()))}"


@dataclass(frozen=True)
class WorkDirs:
    """A data set's folders: its runs and caches (`runs`), its score matrices, tables and external variants
    (`ensemble`), its submission and report (`out`); and `record`, the folder of the machine's throughput record
    (``throughput.json``: shared by every data set, it measures the machine)."""

    name: str
    runs: Path
    ensemble: Path
    out: Path
    record: Path


def work_dirs(root: str | Path, synth: object | None = None, runs: Path | None = None, ensemble: Path | None = None,
              out: Path | None = None) -> WorkDirs:
    """The folders of the data set in `root`: each one given (not None) as is, the others ``runs/{name}/``,
    ``ensemble/{name}/``, ``submissions/{name}/`` (`dataset_name`)."""
    name = dataset_name(root, synth)
    return WorkDirs(name, Path(runs) if runs is not None else RUNS / name,
                    Path(ensemble) if ensemble is not None else ENSEMBLE / name,
                    Path(out) if out is not None else SUBMISSIONS / name, Path(runs) if runs is not None else RUNS)
