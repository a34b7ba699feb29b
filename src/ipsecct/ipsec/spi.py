"""Cluster-unique SPIs: a block of the SPI space per cluster member (RFC 6027 §3.9).

An inbound SPI names an SA at its receiver. When SAs move between the members of a cluster,
two members that picked the same SPI for different SAs collide at whichever receives both:
the draft's deny / renegotiate / reassign policies then cost a renegotiation or a signal to the
MN. Giving each member its own block of the SPI space removes the collision for moves inside
the cluster: a member allocates inbound SPIs only inside its block, and a tunnel keeps its SPI
wherever it moves. The policies remain for SAs from outside the cluster.

The space 0x100..0xFFFFFFFF (RFC 4303: 1-255 reserved, 0 local use) is cut into ``count``
equal blocks; member ``index`` (0-based) owns block ``index``. In the pair mode the index is
fixed by configuration; in the etcd mode a member claims a free block through etcd.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass

SPI_MIN = 0x100
SPI_MAX = 0xFFFFFFFF
MAX_BLOCKS = 4096


@dataclass(frozen=True)
class SpiBlock:
    """Inclusive range of SPIs a member allocates from."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not SPI_MIN <= self.first <= self.last <= SPI_MAX:
            raise ValueError(f"SPI block 0x{self.first:x}-0x{self.last:x} out of range")

    def __contains__(self, spi: object) -> bool:
        return isinstance(spi, int) and self.first <= spi <= self.last

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def candidates(self, rng: Callable[[int], int] = secrets.randbelow) -> Iterator[int]:
        """Random SPIs from the block (for ``SAD.free_spi``); endless."""
        while True:
            yield self.first + rng(self.size)

    def __str__(self) -> str:
        return f"0x{self.first:08x}-0x{self.last:08x}"


def block(index: int, count: int) -> SpiBlock:
    """Block ``index`` (0-based) of ``count`` equal blocks of the SPI space."""
    if not 1 <= count <= MAX_BLOCKS:
        raise ValueError(f"the SPI space is cut into 1 to {MAX_BLOCKS} blocks")
    if not 0 <= index < count:
        raise ValueError(f"block {index} of {count} does not exist")
    span = (SPI_MAX - SPI_MIN + 1) // count
    first = SPI_MIN + index * span
    last = SPI_MAX if index == count - 1 else first + span - 1
    return SpiBlock(first, last)


def parse_range(text: str) -> SpiBlock:
    """``"0x10000000-0x1fffffff"`` (decimal or hex)."""
    lo, sep, hi = text.partition("-")
    if not sep:
        raise ValueError("an SPI range is FIRST-LAST")
    try:
        return SpiBlock(int(lo.strip(), 0), int(hi.strip(), 0))
    except ValueError as exc:
        raise ValueError(f"bad SPI range {text!r}: {exc}") from None


def index_of(spi: int, count: int) -> int:
    """Which of ``count`` blocks ``spi`` falls in."""
    span = (SPI_MAX - SPI_MIN + 1) // count
    return min((spi - SPI_MIN) // span, count - 1)
