"""Atomic file writes: a reader, or a crash, sees the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

NAME_MAX = 255  # bytes in one file name on the usual file systems (ext4, XFS, APFS, NTFS: 255 characters)
SIBLING_RESERVE = 64  # bytes of a name left for what a hidden sibling adds (".", ".tmpPID-TID", ".rankR-of-N.part")


def short_name(name: str, reserve: int = SIBLING_RESERVE) -> str:
    """``name``, or where it leaves fewer than ``reserve`` bytes of a file name free, its start and a digest of all
    of it: the stem of the hidden files made beside an output (temporary file, lock, part files), which would
    otherwise be too long to create (ENAMETOOLONG) for an output name near the limit. One name gives one stem."""
    raw = os.fsencode(name)
    if len(raw) + reserve <= NAME_MAX:
        return name
    digest = "~" + hashlib.sha256(raw).hexdigest()[:16]
    room = max(NAME_MAX - reserve - len(digest), 0)
    return os.fsdecode(raw[:room]).encode("utf-8", "ignore").decode("utf-8", "ignore") + digest


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it replaces ``path``.

    The temporary name keeps the suffix (``np.savez`` and PIL go by it) and is unique per
    process and thread. On an exception the temporary file is removed and ``path`` is left
    as it was. With ``durable`` the data is fsynced before the rename (checkpoints).
    The parent folder is created if needed. With ``exclusive`` an existing ``path`` is never
    replaced, even one created by another process while this one wrote (``FileExistsError``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = short_name(path.stem, SIBLING_RESERVE + len(os.fsencode(path.suffix)))
    tmp = path.with_name(f".{stem}.tmp{os.getpid()}-{threading.get_native_id()}{path.suffix}")
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if exclusive:
            _link_or_refuse(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _link_or_refuse(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path`` unless ``path`` exists: a hard link fails atomically if it does (no
    check-then-write race); where the file system has no hard links, a check just before the rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # e.g. a share without hard links
        if path.exists():
            raise FileExistsError(f"{path} exists") from None
        os.replace(tmp, path)


@contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path``'s lock file (``.NAME.lock`` beside it) while the block runs: a second run
    writing the same output is refused instead of folding, replacing or deleting the first one's files.

    Raises:
        OutputPathError: another process holds the lock.
    """
    import fcntl

    from .errors import OutputPathError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{short_name(path.name)}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputPathError(f"another run is writing {path} now (it holds {lock.name}): wait for it to end, "
                                  f"or give another --output_path") from None
        except OSError as exc:  # a file system without locks (some network shares): run, but say it
            log.warning("%s cannot be locked (%s): a second run writing %s at the same time would not be "
                        "stopped", lock, exc.strerror or exc, path)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # while still held: a later run makes a new one
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# what a report or an export must never be written over: films (images, DICOM) and models
INPUT_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".dicom", ".pth", ".pt", ".onnx")


def refuse_input_suffix(path: str | os.PathLike, flag: str, kind: str, allowed: tuple[str, ...] = ()) -> None:
    """Refuse an output named like a film or a model (other than ``allowed`` suffixes).

    Raises:
        OutputPathError: ``path`` ends in one of ``INPUT_SUFFIXES``; the message asks for a ``kind`` path.
    """
    from .errors import OutputPathError

    suffix = Path(path).suffix.lower()
    if suffix in INPUT_SUFFIXES and suffix not in allowed:
        raise OutputPathError(f"{flag} {path} ends in {Path(path).suffix}: it would be written over an image or a "
                              f"model file; give a {kind} path")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (through links and relative paths too)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))


def check_writable(path: str | os.PathLike, flag: str = "--output_path", folder: bool = False) -> Path:
    """``path`` (a file, or with ``folder`` a folder to write files in), checked before any work is done: a
    probe file is written and removed in the nearest folder that exists (the writers create the missing ones;
    the check creates nothing).

    Raises:
        OutputPathError: it is a folder where a file is wanted (or the reverse), or it cannot be written, with
            the reason and what to do.
    """
    from .errors import OutputPathError

    out = Path(path).expanduser()
    if len(os.fsencode(out.name)) > NAME_MAX:
        raise OutputPathError(f"{flag}: the name {out.name[:40]}... is {len(os.fsencode(out.name))} bytes long, "
                              f"more than a file name can be ({NAME_MAX}); give a shorter one (nothing was done yet)")
    if not folder and out.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder; give a file name in it")
    if folder and out.exists() and not out.is_dir():
        raise OutputPathError(f"{flag} {path} is a file; give a folder")
    where = out if folder else out.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise OutputPathError(f"cannot write {flag} {path}: {where} is a file, not a folder; choose another path "
                              f"(nothing was done yet)")
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".pneumoscan-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(f"cannot write {flag} {path}: {exc.strerror or exc}; choose a folder you can write "
                              f"to (nothing was done yet)") from exc
    return out
