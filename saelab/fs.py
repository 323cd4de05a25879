"""File safety: atomic writes under one temp-name rule, fsync, checksums, writability and output checks.

One of the bottom modules (it imports only ``saelab.errors``). Every file saelab writes goes
through here, so a reader sees the old file or the new one, never half of one:

- a file is written under ``temp_name(path)`` (``.NAME.tmp`` beside it), fsynced, renamed over
  ``path`` (``os.replace``: atomic on POSIX), and its folder fsynced so the rename survives a crash;
- a failed write removes its temp file;
- a long pass checks that it can write its output before it starts (``check_writable``), not after.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import pathlib
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator

from saelab.errors import SaelabError


def temp_name(path: str | os.PathLike) -> pathlib.Path:
    """The hidden name a file is written under before its rename: ``.NAME.tmp`` in the same folder (the same
    filesystem, so the rename is atomic)."""
    path = pathlib.Path(path)
    return path.with_name(f".{path.name}.tmp")


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield the temp path to write ``path`` under (by any writer: h5py, safetensors, torch.save); when the body
    returns, the file gets the umask's mode (some writers create it 0600), is fsynced and renamed over ``path``;
    when it raises, the temp file is removed and ``path`` is left as it was."""
    path = pathlib.Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half of one."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that readers see the old or the new file, never half of one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def check_regular(path: str | os.PathLike) -> pathlib.Path:
    """``path``, if it is a regular file (or a link to one): saelab reads no FIFO (a read would wait forever), device
    or socket. A missing path is left to the reader (its own error names what to do); anything else is a one-line
    error."""
    path = pathlib.Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        return path
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise SaelabError(f"{path} is {kind}: saelab reads regular files only")
    return path


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of the regular file ``path`` (``check_regular``)."""
    return check_regular(path).read_text(encoding="utf-8")


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    check_regular(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def finite_json(obj):
    """``obj`` with every NaN / inf float as None (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


# ------------------------------------------------------------------------ writability
def can_write(path: str | os.PathLike) -> OSError | None:
    """None when a file can be created in ``path``'s folder, else the OSError that says why: the one writability test
    every check below uses. The probe is an unnamed temporary file (O_TMPFILE where the filesystem has it), so
    another process listing the folder at that moment (a second rank checking that --out is empty) never sees it."""
    try:
        tempfile.TemporaryFile(dir=pathlib.Path(path).parent).close()
    except OSError as e:
        return e
    return None


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def check_writable_in(folder: str | os.PathLike, name: str) -> None:
    """Before a long pass that ends by writing ``folder/name`` (eval.json, features.h5): a one-line error now if
    it cannot be written there (a read-only folder, a folder in the file's place), not a traceback after the work."""
    target = pathlib.Path(folder).expanduser() / name
    if target.is_dir():
        raise SaelabError(f"{target} is a folder where this writes a file: move it away")
    e = can_write(target)
    if e is not None:
        raise SaelabError(f"{target} cannot be written ({_why(e)}): make {target.parent} writable, or "
                          "copy the SAE folder somewhere you can write")


def write_error(path: pathlib.Path, e: OSError,
                fix: str = "free space or choose another --out; what the run finished before is kept") -> SaelabError:
    """The one-line error of a file that could not be written mid-run (a full disk, a file-size limit, a folder that
    went read-only or away): the file named, the previous complete state kept (its temp file is gone), and ``fix``."""
    return SaelabError(f"{path} could not be written ({_why(e)}): {fix}")


def _unwritable(flag: str, path: pathlib.Path, e: OSError) -> SaelabError:
    return SaelabError(f"{flag} {path} cannot be written ({_why(e)}): choose a file you can write")


def check_output(path: str | os.PathLike, flag: str = "--out", example: str = "out.json") -> pathlib.Path:
    """A command's output file, checked before its work: not a folder, its folder made, and writable; a
    one-line SaelabError naming ``flag`` otherwise."""
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        raise SaelabError(f"{flag} {path} is a folder: pass a file name, e.g. {path / example}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(flag, path, e) from None
    e = can_write(path)
    if e is not None:
        raise _unwritable(flag, path, e)
    return path


def write_output(path: str | os.PathLike, text: str, flag: str = "--out") -> pathlib.Path:
    """``atomic_write_text`` for a command's output file (its folder made); an OSError is a one-line
    SaelabError naming ``flag``, with no temp file left."""
    path = pathlib.Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError as e:
        raise _unwritable(flag, path, e) from None
    return path


def check_free_space(folder: str | os.PathLike, need: int, what: str, fix: str) -> None:
    """Before a long run whose output size is known up front (``need`` bytes into ``folder``): a one-line error now,
    naming both sizes and ``fix``, when the filesystem has not that much free, instead of a full disk hours in."""
    folder = pathlib.Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise SaelabError(f"{what} needs about {need / 2**30:.2f} GiB but {folder} has {free / 2**30:.2f} GiB free: "
                          f"{fix}")


#: the lock file a run holds in its output folder (``run_lock``); folder checks look past it
LOCK_NAME = ".saelab.lock"


def entries(folder: pathlib.Path) -> list[pathlib.Path]:
    """What a folder holds, its run lock left out (a run that died leaves its lock file: it holds nothing)."""
    return [c for c in folder.iterdir() if c.name != LOCK_NAME]


def _same_file(fd: int, path: pathlib.Path) -> bool:
    """Whether ``path`` names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, alternative: str = "choose another --out"):
    """Hold the output folder of a run for the block: a second run into it gets a one-line error naming the first
    (its pid and command) and ``alternative`` instead of interleaving its files with this one's. The lock is the
    kernel's (flock), so a run that dies releases it; the holder removes the file when the block ends.

    The lock is held on the file the path names, not on an inode that was unlinked: a run that opened the file just
    before its holder removed it locks that orphan, finds the path names another file (or none) and opens the path
    again, so two runs never both hold a folder. Only the holder removes or moves the file."""
    import fcntl

    path = pathlib.Path(folder).expanduser() / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise SaelabError(f"{folder} is in use by another saelab run ({holder}): wait for it to finish, or stop "
                              f"it, or {alternative}") from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed it meanwhile: lock the file the path names now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(['saelab', *sys.argv[1:]])}".encode(), 0)
        yield
    finally:
        if _same_file(fd, path):  # ours (replace_held_folder moves it with the folder), never another run's
            path.unlink(missing_ok=True)
        os.close(fd)


def replace_held_folder(staged: pathlib.Path, folder: pathlib.Path) -> None:
    """Rename the finished folder ``staged`` over ``folder``, an empty folder this process holds (``run_lock``),
    moving the lock file with it: ``folder`` then holds ``staged``'s files all at once (one rename) and stays held
    until the lock's block ends. A file another process put into ``folder`` meanwhile stops the rename: a one-line
    error, ``folder`` left as that process has it, ``staged`` still in place for the caller to remove."""
    os.rename(folder / LOCK_NAME, staged / LOCK_NAME)
    try:
        os.replace(staged, folder)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise SaelabError(f"{folder} was written by another process while this run held it: nothing was moved "
                          "into it; run again once that process is done") from None


def out_folder(out: str | os.PathLike, *, resume: bool = False, resumable: bool = True,
               flag: str = "--out") -> pathlib.Path:
    """The output folder of a run (harvest, train, synthetic, fetch), checked and created before the run writes
    anything: not a file, empty unless ``resume`` (``resumable``: the refusal names --resume), writable. What
    ``resume`` needs inside it (a checkpoint, a settings file) the command checks itself."""
    out = pathlib.Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise SaelabError(f"{flag} {out} is a file: pass a folder path")
    if not resume and out.is_dir() and entries(out):
        fix = "pass --resume to continue it, or choose a new --out" if resumable else "choose a new --out or delete it"
        raise SaelabError(f"{flag} {out} already exists: {fix}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SaelabError(f"{flag} {out} cannot be created ({_why(e)}); choose a folder you can write to") from None
    e = can_write(out / "probe")
    if e is not None:
        raise SaelabError(f"{flag} {out} is not writable ({_why(e)}); choose a folder you can write to")
    return out


@contextlib.contextmanager
def no_empty_folder_left(folder: str | os.PathLike):
    """Run the body; if it raises, remove the folders it created at or under ``folder`` (its missing
    parents included) that are still empty, so a run failing before it wrote anything leaves no trace.
    A folder that held anything beforehand is never touched; ``rmdir`` removes only empty folders."""
    folder = pathlib.Path(folder).expanduser().absolute()
    top, keep_top = None, False
    p = folder
    while not p.exists() and p != p.parent:  # the topmost folder this run may create
        top, p = p, p.parent
    if top is None and folder.is_dir() and not any(folder.iterdir()):
        top, keep_top = folder, True  # it existed, empty: remove only what is created inside it
    try:
        yield
    except BaseException:
        if top is not None and top.is_dir():
            for dirpath, _, _ in os.walk(top, topdown=False):
                if keep_top and pathlib.Path(dirpath) == top:
                    continue
                try:
                    os.rmdir(dirpath)
                except OSError:  # not empty (or not ours to remove): keep it
                    pass
        raise


def remove_contents(folder: str | os.PathLike) -> None:
    """Delete everything inside ``folder`` (kept itself) but its run lock: what a failed run wrote into a folder it
    found empty."""
    folder = pathlib.Path(folder)
    for child in entries(folder) if folder.is_dir() else ():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
