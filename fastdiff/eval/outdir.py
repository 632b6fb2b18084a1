"""An output folder that is written and read without following links, and CSV cells that a spreadsheet will not run.

`fastdiff-eval --out DIR` may point at a folder somebody else could write into (a shared /tmp, a CI workspace). So:
DIR itself may not be a symbolic link, and neither may any entry of it that is written or read; every file is written
to a fresh temporary file in DIR (created exclusively, so nothing planted is opened) and renamed over its name, which
replaces a planted hard link instead of writing through it; files are read with O_NOFOLLOW, only when they are
regular files, and only up to a size limit."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


class UnsafeOutputError(SystemExit):
    """The output folder or an entry of it is a link or not a regular file: refused before anything is written."""


def _plain_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UnsafeOutputError(f"not a plain file name for the output folder: {name!r}")
    return name


class OutDir:
    def __init__(self, path) -> None:
        self.path = Path(path)
        if self.path.is_symlink():
            raise UnsafeOutputError(f"--out {self.path} is a symbolic link: refused (give the real folder)")
        self.path.mkdir(parents=True, exist_ok=True)
        if self.path.is_symlink() or not self.path.is_dir():  # is_symlink again: created between the two calls
            raise UnsafeOutputError(f"--out {self.path} is not a folder")

    def check(self, *names: str) -> None:
        """Refuse now, before any work, if one of these entries exists as a link or as anything but a regular file."""
        for name in names:
            p = self.path / _plain_name(name)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeOutputError(f"{p} is a symbolic link: refused (fastdiff-eval never writes through links)")
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeOutputError(f"{p} exists and is not a regular file: refused")

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.path / _plain_name(name))

    def write_bytes(self, name: str, data: bytes) -> Path:
        self.check(name)
        target = self.path / name
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{name}.", suffix=".tmp")  # O_EXCL: a new file
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)  # renames over the entry: a planted link or hard link is replaced, not followed
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return target

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode())

    def read_text(self, name: str, limit: int = 1 << 20) -> str:
        """A regular file's text, never through a link, at most `limit` bytes (else refused)."""
        p = self.path / _plain_name(name)
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as err:
            if os.path.islink(p):
                raise UnsafeOutputError(f"{p} is a symbolic link: refused") from err
            raise
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeOutputError(f"{p} is not a regular file: refused")
            if st.st_size > limit:
                raise UnsafeOutputError(f"{p} is {st.st_size} bytes, more than a result file ({limit}): refused")
            return f.read(limit + 1).decode()


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """A CSV cell a spreadsheet shows as text: a string starting with = + - @ tab or CR (a formula to Excel, LibreOffice,
    Sheets) gets a leading apostrophe (OWASP's CSV-injection advice). Numbers are written as numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value
