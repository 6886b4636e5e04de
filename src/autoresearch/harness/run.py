"""Running train.py as the lab runs it: as __main__, with its failure told by the exit code.

    python -m autoresearch.harness.run train.py

The script runs exactly as `python train.py` would. If it raises, the traceback is printed once and
the exit code says what kind of failure it was, so that the lab names it without reading the text:

    1   an exception of train.py's own
    70  out of memory
    71  TrainingDiverged (the loss went to NaN or blew up)
    72  a module train.py imports is not installed
    73  a rule of the harness was broken (HarnessError)
"""
from __future__ import annotations

import runpy
import sys
import traceback

from .errors import HarnessError

EXIT_ERROR = 1  # an exception of train.py's own
EXIT_OOM = 70  # out of memory, on the GPU or the host
EXIT_DIVERGED = 71  # TrainingDiverged: the loss went to NaN or blew up
EXIT_IMPORT = 72  # train.py imports a module that is not installed
EXIT_HARNESS = 73  # a HarnessError: the run broke a rule of the harness (the message says which)


class TrainingDiverged(HarnessError):
    """train.py raises this when its loss goes to NaN or blows up: the run cannot recover."""


def exit_code(error: BaseException) -> int:
    if isinstance(error, TrainingDiverged):
        return EXIT_DIVERGED
    if isinstance(error, HarnessError):
        return EXIT_HARNESS
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return EXIT_OOM
    if isinstance(error, ImportError):
        return EXIT_IMPORT
    return EXIT_ERROR


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m autoresearch.harness.run TRAIN_PY [ARGS...]")
    path = sys.argv[1]
    sys.argv = sys.argv[1:]
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every failure of the script is reported, then the code says which
        code = exit_code(e)
        if code in (EXIT_DIVERGED, EXIT_HARNESS):
            print(f"FAIL: {e}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
            if code == EXIT_OOM:
                print("FAIL: out of memory. Lower the device batch size (gradient accumulation keeps the step's "
                      "tokens), or make the model smaller, or undo the last change.", file=sys.stderr, flush=True)
        sys.stderr.flush()
        sys.exit(code)


if __name__ == "__main__":
    # Run as `python -m`, this file is __main__, a second copy of the module: its TrainingDiverged is not
    # the class train.py raises (imported from autoresearch.harness.run). The imported module's main()
    # tells the failures apart by the classes train.py sees.
    from autoresearch.harness import run

    run.main()
