"""Running train.py as the lab runs it: as __main__, with its failure told by the exit code.

    python -m autoresearch.harness.run train.py
    python -m autoresearch.harness.run --nproc-per-node=K train.py   # K data-parallel ranks, under torchrun
    python -m autoresearch.harness.run --standby=torch,torch._dynamo train.py   # imports first, then waits

The script runs exactly as `python train.py` (or `torchrun --nproc-per-node=K train.py`) would. If it
raises, the traceback is printed once and the exit code says what kind of failure it was, so that the
lab names it without reading the text:

    1   an exception of train.py's own
    70  out of memory
    71  TrainingDiverged (the loss went to NaN or blew up)
    72  a module train.py imports is not installed
    73  a rule of the harness was broken (HarnessError)

With K ranks, the first rank to fail ends them all (torchrun stops the others), and the launcher exits
with that rank's code, its last line after `rank R of K:` as the last line of the output.

With --standby, the launcher first imports the modules it names (harness code only: torch and its
compiler take 10-15 s to import on a GPU host) and starts CUDA where there is a GPU, then waits for the
lab's word on its standard input: `go` runs train.py as above, anything else (the end of the input)
exits 0 without running it. The lab starts a trial this way before the trial is known (lab.executor's
standby), in that trial's own fresh sandbox, so that the imports are done by the time train.py is.
Environment variables that those modules read as they are imported (TORCHINDUCTOR_*, TORCHDYNAMO_*) are
read before train.py could set them: train.py sets compiler options through torch._inductor.config and
torch._dynamo.config instead.
"""
from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import time
import traceback

from .errors import HarnessError

EXIT_ERROR = 1  # an exception of train.py's own
EXIT_OOM = 70  # out of memory, on the GPU or the host
EXIT_DIVERGED = 71  # TrainingDiverged: the loss went to NaN or blew up
EXIT_IMPORT = 72  # train.py imports a module that is not installed
EXIT_HARNESS = 73  # a HarnessError: the run broke a rule of the harness (the message says which)
NPROC_FLAG = "--nproc-per-node="  # torchrun's name for it
STANDBY_FLAG = "--standby="  # modules to import before train.py is known, comma-separated
GO = "go"  # the lab's word, on standard input, that train.py is in place
READY_FILE = ".autoresearch-standby-ready"  # left in $TMPDIR once a standby's imports are done
# The harness's kernels that the template imports on CUDA, with what they import as they run.
CUDA_KERNEL_MODULES = ("autoresearch.harness.cudnn_attention", "autoresearch.harness.softcap_loss", "cudnn")
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # where torchrun asks each rank to leave word of its failure
OOM_ADVICE = ("FAIL: out of memory. Lower the device batch size (gradient accumulation keeps the step's tokens), "
              "or make the model smaller, or undo the last change.")


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


def run_script(argv: list[str]) -> None:
    """Run train.py (argv[0], with its arguments) as __main__; exit with the code of its failure, if any."""
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every failure of the script is reported, then the code says which
        code = exit_code(e)
        if code in (EXIT_DIVERGED, EXIT_HARNESS):
            last = f"FAIL: {e}"
            print(last, file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            if code == EXIT_OOM:
                last = OOM_ADVICE
                print(last, file=sys.stderr, flush=True)
        sys.stderr.flush()
        if os.environ.get(ERROR_FILE_ENV):  # a rank under torchrun
            with open(os.environ[ERROR_FILE_ENV], "w") as f:  # torchrun's format, with a finer timestamp
                json.dump({"message": last, "timestamp": time.time(), "exitcode": code}, f)
            sys.stdout.flush()
            os._exit(code)  # tearing down a live process group can abort the process, losing the code
        sys.exit(code)


def launch(ranks: int, argv: list[str]) -> None:
    """Run train.py on `ranks` processes of this machine under torchrun, each as run_script runs it; if one
    fails, exit as it did, with its last line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The ranks meet on the loopback: in the lab's sandbox, no name resolves to this machine.
    torchrun = ["--standalone", "--local-addr=127.0.0.1", f"--nproc-per-node={ranks}"]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        run(parse_args([*torchrun, "-m", "autoresearch.harness.run", *argv]))
    except ChildFailedError as e:
        rank, failure = first_failure(e.failures)
        reported = failure.error_file_data
        if "exitcode" in reported:
            code, last = int(reported["exitcode"]), str(reported["message"])
        elif failure.exitcode < 0:
            code, last = EXIT_ERROR, f"killed by signal {-failure.exitcode} ({failure.signal_name()})"
        else:
            code, last = failure.exitcode, f"exited with code {failure.exitcode}"
        print(f"rank {rank} of {ranks}: {last}", file=sys.stderr, flush=True)
        sys.exit(code)


def first_failure(failures: dict):
    """(rank, failure) of the rank that failed first. The others failed because it did: torchrun ended them
    (SIGTERM), or their collectives broke off a moment after it left, so they come after it by what ended
    them, then by when each left."""
    def when(item):
        _, failure = item
        ended_by_torchrun = failure.exitcode == -signal.SIGTERM and "exitcode" not in failure.error_file_data
        return ended_by_torchrun, float(failure.error_file_data.get("timestamp", failure.timestamp))

    return min(failures.items(), key=when)


def prepare(modules) -> None:
    """Import `modules`, then, where torch came with them and sees a GPU, start CUDA (a second or two on a
    GPU host): harness code only, done before train.py is known. An import that fails is left for
    train.py's own import to report."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - train.py's own import of it tells what is wrong, with its exit code
            return
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.empty(1, device="cuda")  # the context, made now rather than at train.py's first tensor


def stand_by(modules: list[str]) -> bool:
    """Prepare `modules`, then wait for the lab: True once it says go, False at the end of the input."""
    prepare(modules)
    with open(os.path.join(os.environ.get("TMPDIR", "/tmp"), READY_FILE), "w"):
        pass
    word = sys.stdin.readline().strip()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # train.py's standard input is empty, as in a trial started at once
    os.close(null)
    return word == GO


def main() -> None:
    argv = sys.argv[1:]
    standby = argv.pop(0)[len(STANDBY_FLAG):].split(",") if argv and argv[0].startswith(STANDBY_FLAG) else None
    ranks = int(argv.pop(0)[len(NPROC_FLAG):]) if argv and argv[0].startswith(NPROC_FLAG) else 1
    if not argv or (standby is not None and ranks > 1):
        sys.exit(f"usage: python -m autoresearch.harness.run [{STANDBY_FLAG}MODULES | {NPROC_FLAG}K] TRAIN_PY [ARGS...]")
    if standby is not None and not stand_by([m for m in standby if m]):
        return
    if ranks > 1:
        launch(ranks, argv)
    else:
        run_script(argv)


if __name__ == "__main__":
    # Run as `python -m`, this file is __main__, a second copy of the module: its TrainingDiverged is not
    # the class train.py raises (imported from autoresearch.harness.run). The imported module's main()
    # tells the failures apart by the classes train.py sees.
    from autoresearch.harness import run

    run.main()
