"""Crash-safe writes: a temporary name beside the target, fsync, then an atomic rename.

A process killed at any moment leaves the old file or the new one, never a mix; at worst a
temporary `NAME.tmp-PID` stays behind, which no reader opens and the next write into a run's
folder, or the next build of the same data (under its lock), removes. A write that fails (disk
full, no permission) removes its temporary and raises a NeoxlabError naming the path and the
reason.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from neoxlab.errors import NeoxlabError

TMP_MARKER = ".tmp-"
# flock's answers on filesystems without locks (Lustre mounted without `flock`, some FUSE ones)
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


def temporary_path(path: Path, purpose: str = "") -> Path:
    """Where `path` is written before the rename: same folder (rename is atomic only within a
    filesystem), and a per-process name (two processes preparing one file never collide)."""
    return path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}{purpose}")


def is_temporary(path: Path) -> bool:
    return TMP_MARKER in path.name


def remove_temporaries(folder: Path, owned: Callable[[str], bool] = lambda name: True) -> None:
    """Delete the temporaries that killed writes left in `folder`: all of them (a run's own
    folders: only one process writes there, so any temporary found is an orphan), or those of
    the files whose final names `owned` accepts (what the holder of a build lock builds)."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if not is_temporary(path) or not owned(path.name.partition(TMP_MARKER)[0]):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def make_folders(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns those it created, innermost first, for
    `remove_empty_folders` after a failed write (which must not leave empty folders behind)."""
    created = [path for path in (folder, *folder.parents) if not path.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return created


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove those of `folders` (innermost first) that are empty: a folder another process
    wrote into meanwhile stays."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def output_folder(folder: Path) -> Iterator[Path]:
    """`folder`, created with its parents for the with-block; those it created are removed
    again, when still empty, if the block fails."""
    created = make_folders(folder)
    try:
        yield folder
    except BaseException:
        remove_empty_folders(created)
        raise


def write_error(path: Path, err: Exception) -> NeoxlabError:
    """The one-line error for a failed write of `path` (an OSError, or a library's error that
    wraps one, as safetensors' "I/O error: No space left on device (os error 28)")."""
    reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[0]
    wrapped = re.search(r"I/O error: (.+?) \(os error \d+\)", reason)
    if wrapped:
        reason = wrapped.group(1)
    return NeoxlabError(
        f"could not write {path}: {reason}",
        hint="free disk space or fix permissions; what was there before is untouched",
    )


def write_atomically(path: Path, content: str | bytes) -> None:
    """Replace `path` with `content` (str is written as UTF-8) in one atomic step."""
    path = Path(path)
    temporary = temporary_path(path)
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        raise write_error(path, err) from None


def process_umask() -> int:
    """This process's umask. Linux shows it in /proc; elsewhere it is read by setting it and
    setting it back, which a thread creating a file at that instant could notice."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_default_permissions(path: Path) -> None:
    """The mode `open()` gives a new file (0666 less the umask), for a file that a library wrote
    through a private temporary: safetensors >= 0.8 does, and leaves its files 0600, readable by
    no one else (safetensors issue #782), while every other file of a run is 0644."""
    os.chmod(path, 0o666 & ~process_umask())


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable (a power cut must not undo it)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] = lambda: None) -> Iterator[bool]:
    """Hold an exclusive lock on `path` (an empty file, created if missing) for the with-block,
    so that processes building the same files take turns; `on_wait()` is called first when
    another process holds it. The kernel releases a lock when its holder exits, however it
    exits, so a killed holder leaves none behind; the empty file stays. Where the filesystem
    has no locks, the block runs unlocked (each file is still written atomically). The block
    receives whether it holds the lock."""
    try:
        handle = open(path, "ab")  # noqa: SIM115 (closed below, which releases the lock)
    except OSError as err:
        raise write_error(path, err) from None
    with handle:
        locked = True
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in NO_LOCKS:
                raise
            locked = False
        yield locked
