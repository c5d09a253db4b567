"""The one safe reader of a record's files, for everything that reads a record back (greta verify, analyze).

A record may come from anyone, so reading it must neither leave the directory nor stall:
  - a member's name is a plain relative path: not absolute, no `..`, `.` or empty component, no NUL;
  - every component is opened relative to its parent's descriptor with O_NOFOLLOW: a symlinked file or
    directory is refused, never followed;
  - only a regular file is opened (checked with lstat before opening, so no FIFO or device is ever opened,
    and with fstat after, on the descriptor actually read), with O_NONBLOCK, so nothing can block;
  - each kind of file has a size cap (CAPS), checked on the descriptor and again while reading.

    with open_member(run_dir, "logits.npz") as f: ...       # a binary file object, or MemberError
    read_member(run_dir, "verdict.json")                      # bytes
    member_kind(run_dir, "report.md")                         # "file", "directory", "symlink", "FIFO", ... or None
    entries(run_dir)                                          # every entry, recursively, dot-files included
"""
from __future__ import annotations

import os
import stat
import zipfile
from contextlib import contextmanager
from pathlib import PurePosixPath

MiB, GiB = 2**20, 2**30
# bytes per file kind (by suffix): generous for what greta writes, small enough that no read can exhaust memory
CAPS = {".json": 64 * MiB, ".md": 16 * MiB, ".csv": 256 * MiB, ".jsonl": 256 * MiB, ".ipynb": 256 * MiB,
        ".html": 256 * MiB, ".png": 64 * MiB, ".npz": 16 * GiB}
DEFAULT_CAP = 64 * MiB
PATH_MAX = 4096
MAX_DEPTH = 32  # directory levels entries() enters (a record has one; a hostile tree cannot exhaust the stack)
NPZ_UNPACKED_CAP = 32 * GiB  # what an .npz may declare its arrays to unpack to (a zip bomb is refused before)
NOT_REGULAR = "not a regular file: a record holds only regular files"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class MemberError(ValueError):
    """A record member that may not be read: outside the record, not a regular file, or over its size cap.
    The message is one line naming the member; `detail` is the same without the name."""

    def __init__(self, name: str, detail: str):
        super().__init__(f"{name} {detail}")
        self.name, self.detail = name, detail


def cap_for(name: str) -> int:
    return CAPS.get(PurePosixPath(name).suffix.lower(), DEFAULT_CAP)


def name_problem(name) -> str | None:
    """Why `name` is not a plain relative path inside a record (None: it is one)."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if "\0" in name:
        return "holds a NUL character"
    if len(name.encode("utf-8", "surrogatepass")) > PATH_MAX:
        return f"is longer than a path may be ({PATH_MAX} bytes)"
    if name.startswith("/"):
        return "is an absolute path, outside the record"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "leaves the record directory or is not a plain path (a '..', '.' or empty component)"
    return None


def kind_of(mode: int) -> str:
    for test, kind in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def _open_parent(run_dir, name: str) -> tuple[int, str]:
    """(a descriptor of the directory holding name, name's last component), every directory on the way
    opened without following a symlink. FileNotFoundError when a component is absent."""
    why = name_problem(name)
    if why:
        raise MemberError(repr(name) if isinstance(name, str) else "a manifest entry", why)
    parts = name.split("/")
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        for i, part in enumerate(parts[:-1]):
            mode = os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
            if not stat.S_ISDIR(mode):
                raise MemberError(name, f"is not readable: {'/'.join(parts[:i + 1])} is a {kind_of(mode)}, "
                                  "not a directory (symlinks are never followed)")
            sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def member_kind(run_dir, name: str) -> str | None:
    """What name is in the record without following symlinks: "file", "directory", "symlink", "FIFO", ...;
    None when it is absent. MemberError for a name outside the record or under a non-directory."""
    try:
        fd, last = _open_parent(run_dir, name)
    except FileNotFoundError:
        return None
    try:
        return kind_of(os.stat(last, dir_fd=fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return None
    finally:
        os.close(fd)


def is_member_file(run_dir, name: str) -> bool:
    """name is a regular file of the record (not a symlink to one)."""
    try:
        return member_kind(run_dir, name) == "file"
    except MemberError:
        return False


def _open_fd(run_dir, name: str, cap: int) -> tuple[int, int]:
    """(descriptor, size) of the regular file name, within cap; FileNotFoundError or MemberError."""
    fd_dir, last = _open_parent(run_dir, name)
    try:
        mode = os.stat(last, dir_fd=fd_dir, follow_symlinks=False).st_mode
        if not stat.S_ISREG(mode):  # checked before opening: a FIFO or device is never opened at all
            raise MemberError(name, f"is a {kind_of(mode)}, {NOT_REGULAR}")
        try:
            fd = os.open(last, _FILE_FLAGS, dir_fd=fd_dir)
        except OSError as e:
            raise MemberError(name, f"cannot be opened: {e.strerror or e}") from None
    finally:
        os.close(fd_dir)
    st = os.fstat(fd)  # what was opened, not what the name pointed to a moment before
    if not stat.S_ISREG(st.st_mode) or st.st_size > cap:
        os.close(fd)
        why = (f"is a {kind_of(st.st_mode)}, not a regular file" if not stat.S_ISREG(st.st_mode)
               else f"is {st.st_size} bytes, over the {cap} bytes a {PurePosixPath(name).suffix or 'plain'} file may have")
        raise MemberError(name, why)
    return fd, st.st_size


def open_member(run_dir, name: str, cap: int | None = None):
    """A binary file object of the regular file name inside run_dir (see the module docstring)."""
    fd, _ = _open_fd(run_dir, name, cap_for(name) if cap is None else cap)
    return os.fdopen(fd, "rb")


def read_member(run_dir, name: str, cap: int | None = None) -> bytes:
    """The bytes of the regular file name inside run_dir, at most its cap (a file that grows past it while
    read is refused too)."""
    cap = cap_for(name) if cap is None else cap
    with open_member(run_dir, name, cap) as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise MemberError(name, f"grew past the {cap} bytes a {PurePosixPath(name).suffix or 'plain'} file may have")
    return data


@contextmanager
def open_npz(run_dir, name: str):
    """numpy's NpzFile of the .npz member name (allow_pickle off), once the archive's declared unpacked size
    is within NPZ_UNPACKED_CAP (no zip bomb). Raises MemberError, FileNotFoundError, or what zipfile and numpy
    raise for a corrupt archive."""
    import numpy as np

    with open_member(run_dir, name) as f:
        with zipfile.ZipFile(f) as z:  # not a zip (also a bare .npy): BadZipFile, before numpy sees it
            declared = sum(i.file_size for i in z.infolist())
        if declared > NPZ_UNPACKED_CAP:
            raise MemberError(name, f"declares {declared} bytes of arrays, over the {NPZ_UNPACKED_CAP} allowed")
        f.seek(0)
        with np.load(f, allow_pickle=False) as z:
            yield z


def load_npz(run_dir, name: str) -> dict:
    """Every array of the .npz member name, read eagerly (see open_npz)."""
    import numpy as np

    with open_npz(run_dir, name) as z:
        return {k: np.asarray(z[k]) for k in z.files}


def entries(run_dir) -> dict[str, str]:
    """Every entry under run_dir by relative posix path -> its kind, recursively, dot-files included. Each
    directory is entered through its parent's descriptor with O_NOFOLLOW, so a symlinked directory is listed
    as a symlink and never entered, even if swapped in while listed; below MAX_DEPTH levels a directory is
    listed but not entered."""
    out: dict[str, str] = {}

    def walk(fd: int, prefix: str, depth: int):
        with os.scandir(fd) as it:
            items = sorted(it, key=lambda e: e.name)
        for e in items:
            rel = prefix + e.name
            try:
                out[rel] = kind_of(e.stat(follow_symlinks=False).st_mode)
            except FileNotFoundError:
                continue  # gone since listed
            if out[rel] != "directory" or depth >= MAX_DEPTH:
                continue
            try:
                sub = os.open(e.name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue  # unreadable or swapped for a symlink: listed, not entered
            try:
                walk(sub, rel + "/", depth + 1)
            finally:
                os.close(sub)

    root = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        walk(root, "", 1)
    finally:
        os.close(root)
    return out
