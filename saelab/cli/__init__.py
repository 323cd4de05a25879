"""The ``saelab`` command line: parse, call the library, report.

One module per command group, each with its parser (``add_parser``) and its handlers (``cmd_*``). Nothing
below this package knows a flag's spelling beyond the config fields that declare it, or prints a line for
a user: the handlers do. A ``SaelabError`` is printed on one line and exits 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
import warnings

from saelab import __version__
from saelab.cli import analyze, app, attribute, circuit, compare, demo, evaluate, fetch, harvest, heads, steer, train
from saelab.errors import SaelabError

#: the command groups in the order ``saelab --help`` lists them: the pipeline first, then the tools
GROUPS = (harvest, train, evaluate, analyze, compare, steer, circuit, attribute, heads, fetch, demo, app)


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its errors on one line (a flag's bad value, a missing flag), naming where the flags
    are listed, instead of the whole usage block; every subcommand's parser is one (argparse makes them of the
    parent's class)."""

    def error(self, message: str):
        message = message.replace("invalid int value", "not a whole number").replace("invalid float value",
                                                                                  "not a number")
        what = "commands" if self.prog == "saelab" else "flags"
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the {what})\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="saelab", description="Sparse autoencoder workbench.")
    p.add_argument("--version", action="version", version=f"saelab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    return p


#: the errors of a write the filesystem has no room for, or no longer takes
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}
#: what to do about the other errors a path can meet (a name too long, a folder gone or never made, no permission)
_PATH_FIX = {
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.ENOENT: "the folder is not there (it was moved, deleted, or never made): check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder: pass a file",
    errno.EACCES: "choose a place you may write to, or change its permissions",
    errno.EPERM: "choose a place you may write to, or change its permissions",
    errno.ELOOP: "the path loops through symbolic links: check the path",
    errno.EEXIST: "something else made it meanwhile: choose another name",
}


class _Signals:
    """SIGTERM ends a command as Ctrl-C does: its cleanup runs (no temp file left, the previous complete state
    kept), and it says how to resume. Both are recorded, so an error that a library raised because the interrupt
    landed inside it (h5py reports one as an error of its own) is reported as the interrupt it was."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def __call__(self, signum, frame):
        self.seen.append(signum)
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", None) not in (None, "auto"):  # a device this torch cannot use: before any work
            from saelab.device import pick_device

            pick_device(args.device)
        if hasattr(args, "nproc"):
            from saelab.cli.common import from_args
            from saelab.options import DistributedOptions

            from_args(DistributedOptions, args)  # its numbers, before a process is started
        if (getattr(args, "nproc", None) or 1) > 1 and not os.environ.get("WORLD_SIZE"):
            from saelab import distributed

            distributed.exec_torchrun(args.nproc, distributed.strip_nproc(sys.argv[1:] if argv is None else argv))
        old, signals = {}, _Signals()
        if threading.current_thread() is threading.main_thread():
            old = {s: signal.signal(s, signals) for s in (signal.SIGINT, signal.SIGTERM)}
            # a file-size limit (ulimit -f) makes a write fail with EFBIG, as a full disk does, instead of killing
            # the process mid-write: the run's cleanup then leaves no temp file
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            return args.func(args)
        except Exception:
            if signals.seen:  # the error of an interrupt that landed inside a library: it was the interrupt
                raise KeyboardInterrupt from None
            raise
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
    except SaelabError as e:
        print(f"saelab: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # a filesystem error the command met on a path (the writers' cleanup has run: no temp file is left);
        # SAELAB_TRACEBACK=1 shows where, for a bug report
        if os.environ.get("SAELAB_TRACEBACK") or not (e.errno in _NO_ROOM or e.errno in _PATH_FIX):
            raise
        resume = " (then resume with --resume)" if getattr(args, "resume", None) is not None else ""
        if e.errno in _NO_ROOM:
            print(f"saelab: error: {e.filename or 'a file'} could not be written ({e.strerror}): free space or "
                  f"choose another --out{resume}", file=sys.stderr)
        else:
            print(f"saelab: error: {e.filename or 'a path'}: {e.strerror}: {_PATH_FIX[e.errno]}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # pathlib (Python < 3.13) reports a symlink loop as a RuntimeError, not as an OSError ELOOP
        if os.environ.get("SAELAB_TRACEBACK") or not str(e).startswith("Symlink loop from "):
            raise
        print(f"saelab: error: {str(e)[len('Symlink loop from '):]}: {_PATH_FIX[errno.ELOOP]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saelab: interrupted" + (" (resume with --resume)" if hasattr(args, "resume") else ""), file=sys.stderr)
        return 130


def entry() -> None:
    """The `saelab` command: ``main``, then exit with its status; a torchrun rank and an interrupted command leave
    without the interpreter's finalisation (``distributed.exit_rank``: a teardown after an interrupt could crash,
    a segfault or a second SIGINT, after the one-line message)."""
    code = main()
    from saelab import distributed

    if distributed.launched() or code == 130:
        distributed.exit_rank(code)
    raise SystemExit(code)


if __name__ == "__main__":
    entry()
