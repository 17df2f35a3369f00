"""The process behind tests/test_faults.py: `python tests/fault_driver.py PLAN.json`.

It wraps `kinret.io.atomic_path` (every completed write is logged; a run kills itself with SIGKILL at write number
`kill_at`, after its rename, or before it when `inside`), imports make_submission.py's code once (with the modules
it imports lazily), then runs every make_submission.py of the plan in a forked child of itself: the uninterrupted
reference run, and for each case a run killed at the first write of its kind followed by a rerun in the same folder.
Forking spares each run its imports (about 5 s); the kills stay real SIGKILLs of whole processes. The parent computes
nothing itself (torch's and cv2's thread pools start in the children), and a child that hangs all the same is ended
by an alarm after RUN_LIMIT seconds. The runs train with one thread (`os.cpu_count` reads 1 in them): what is checked
does not depend on it, and two threads on these tiny tensors mostly wait for each other when other jobs share the
cores. What each run did is written to the plan's `results` file for the test to check.

PLAN.json: {"data": DIR, "root": DIR, "results": FILE, "argv": [...], "cases": [[kind, inside], ...]}; each run
writes under root/<name>/ (runs/, ens/, sub/, writes.log of its completed writes, output.log).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

KINDS = {  # a write of each kind: (the end of its target's path, a part its path must hold)
    "pixel cache": (".npy", "/_cache/pixels_"),  # the decoded pixels the trainer caches
    "checkpoint": ("checkpoint.pt", ""),
    "state": ("state.json", ""),
    "feature chunk": (".npz", ".parts/"),  # the first chunk of a cache under *.parts/
    "score matrix": (".npy", "/scores/"),
    "selection": ("selection.json", ""),
    "CSV": ("predictions.csv", ""),
    "zip": (".zip", ""),
}


def is_kind(target: str, kind: str) -> bool:
    ending, part = KINDS[kind]
    return target.endswith(ending) and part in target


def first_write(writes: list[str], kind: str) -> int:
    """The 1-based number of the first write of `kind` in a run's write log."""
    for i, target in enumerate(writes, start=1):
        if is_kind(target, kind):
            return i
    raise AssertionError(f"the uninterrupted run made no {kind} write")


def case_name(kind: str, inside: bool) -> str:
    return f"{kind.replace(' ', '_')}_{'inside' if inside else 'after'}"


RUN_LIMIT = 600  # seconds a run may take
HOOK = {"kill_at": 0, "inside": False, "log": ""}
COUNT = [0]


def install_hook() -> None:
    """Wrap kinret.io.atomic_path before any other kinret module imports it."""
    import kinret.io as kio

    original = kio.atomic_path

    @contextlib.contextmanager
    def atomic_path(target, suffix=""):
        with original(target, suffix) as tmp:
            yield tmp
            if HOOK["inside"] and COUNT[0] + 1 == HOOK["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)  # the temporary is written, the rename never happens
        COUNT[0] += 1
        with open(HOOK["log"], "a") as f:
            f.write(f"{target}\n")
        if COUNT[0] == HOOK["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)

    kio.atomic_path = atomic_path


def load_kit():
    """make_submission.py's main, imported with what it imports lazily (once here, not in every run)."""
    install_hook()
    import matplotlib.backends.backend_agg  # noqa: F401  (the report)
    import timm  # noqa: F401  (building a backbone)

    import kinret.train.cli  # noqa: F401  (the grid's trainer)
    from kinret.submission.make import main

    os.cpu_count = lambda: 1  # the grid gives its runs cpu_count() threads
    return main


def run(main, work: Path, argv: list[str], kill_at: int = 0, inside: bool = False) -> int:
    """make_submission.py writing under `work`, in a forked child; its exit code (-9 when it was killed)."""
    work.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            signal.alarm(RUN_LIMIT)  # a child that hangs ends with SIGALRM (exit code -14) instead of the test
            import torch

            torch.set_num_threads(1)  # also where no training sets it (a rerun with every run finished)
            HOOK.update(kill_at=kill_at, inside=inside, log=str(work / "writes.log"))
            out = os.open(work / "output.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(out, 1)
            os.dup2(out, 2)
            code = main([*argv, "--runs", str(work / "runs"), "--ensemble-dir", str(work / "ens"), "--out",
                         str(work / "sub")])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def writes_of(work: Path) -> list[str]:
    log = work / "writes.log"
    return log.read_text().splitlines() if log.exists() else []


def drive(plan: dict) -> dict:
    main = load_kit()
    root, argv = Path(plan["root"]), ["--data-root", plan["data"], *plan["argv"]]
    reference = root / "uninterrupted"
    results = {"uninterrupted": {"code": run(main, reference, argv), "writes": writes_of(reference)}}
    if results["uninterrupted"]["code"] != 0:
        return results  # nothing to compare with: the test reports the reference's output
    for kind, inside in plan["cases"]:
        work = root / case_name(kind, inside)
        kill_at = first_write(results["uninterrupted"]["writes"], kind)
        killed = run(main, work, argv, kill_at, inside)
        done = len(writes_of(work))
        (work / "writes.log").unlink(missing_ok=True)
        results[work.name] = {"kill_at": kill_at, "killed": killed, "done": done, "rerun": run(main, work, argv)}
    return results


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["results"]).write_text(json.dumps(drive(spec), indent=1))
