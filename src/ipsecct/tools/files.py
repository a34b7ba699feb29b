"""Reading the files an operator names (configurations, key and secret files, certificates,
contexts) without trusting them to be small or finite.

``/dev/zero``, ``/dev/urandom``, a FIFO nobody writes to or a multi-gigabyte file given as a
configuration made ``ipsecct`` read forever (or block in ``open``). These functions open
without blocking, accept only regular files, and read at most ``limit`` octets: anything
else is an :class:`OSError` whose ``strerror`` says what is wrong, which every caller
already turns into its one-line error.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

CONFIG_LIMIT = 16 << 20  # a configuration (10,000 [[tunnel]] tables are about 4 MiB)
SECRET_LIMIT = 1 << 20  # a key, pre-shared key, certificate or epoch file
INPUT_LIMIT = 64 << 20  # what a command reads as its input (contexts, SA lists)


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} octets"


def read_limited(path: str | Path, limit: int) -> bytes:
    """The content of the regular file ``path``, at most ``limit`` octets (more: OSError)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: a FIFO without a writer does not block here
    except ValueError:  # a NUL in the name
        raise OSError(errno.EINVAL, "bad file name", repr(str(path))) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {_mib(limit)}", str(path))
        os.set_blocking(fd, True)
        return _read_fd(fd, limit, str(path))
    finally:
        os.close(fd)


def read_stream_limited(f: BinaryIO, limit: int) -> bytes:
    """At most ``limit`` octets of an open stream (standard input); more is an OSError."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"the input is larger than {_mib(limit)}")
    return data


def check_size(path: str | Path, limit: int) -> None:
    """``path`` is a regular file of at most ``limit`` octets (for files another library
    opens by name: OpenSSL's certificate and key loaders)."""
    read_limited(path, limit)


def _read_fd(fd: int, limit: int, path: str) -> bytes:
    chunks: list[bytes] = []
    n = 0
    while True:
        b = os.read(fd, min(1 << 20, limit + 1 - n))
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        n += len(b)
        if n > limit:  # it grew while we read it
            raise OSError(errno.EFBIG, f"larger than {_mib(limit)}", path)
