"""Anti-replay window and extended sequence numbers (RFC 4303 §3.4.3 and Appendix A, RFC 6479).

The window is a ring of 64-bit blocks (RFC 6479): accepting a packet far ahead clears the
blocks it skips, and nothing is ever shifted. ``check`` is called before the ICV is verified and
``update`` only after, so a forged packet never moves the window.

The complete state (highest sequence number accepted and the bitmap below it) is readable with
:meth:`ReplayWindow.snapshot` and restorable with :meth:`ReplayWindow.restore`, because a context
transfer moves it.
"""

from __future__ import annotations

import struct

from ..errors import SAError

MAX_WINDOW = 65536
_BLOCK_BITS = 64
_MASK32 = 0xFFFFFFFF


def _reverse(x: int, width: int) -> int:
    """``x`` with its low ``width`` bits in reverse order (the reference form)."""
    return int(format(x, f"0{width}b")[::-1], 2)


# Each octet with its bits reversed: reversing all the bits of a number whose width is whole
# octets is reversing its octets and the bits of each (C-level, not a 1024-digit string).
_REV8 = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


_WORDS: dict[int, struct.Struct] = {}


def _words(k: int) -> struct.Struct:
    """``k`` little-endian 64-bit words."""
    w = _WORDS.get(k)
    if w is None:
        w = _WORDS[k] = struct.Struct(f"<{k}Q")
    return w


class ReplayWindow:
    """Sliding window over 64-bit sequence numbers (32-bit SAs use the low half only)."""

    __slots__ = ("_blocks", "_nblocks", "esn", "size", "top")

    def __init__(self, size: int = 64, *, esn: bool = False) -> None:
        if size < 0 or size > MAX_WINDOW or (size and size % 32):
            raise SAError(f"replay window size must be 0 or a multiple of 32 up to {MAX_WINDOW}")
        self.size = size
        self.esn = esn
        self.top = 0  # highest sequence number accepted so far (0: none)
        # One block more than the window needs, so the top block never clobbers the oldest bits.
        self._nblocks = (size + _BLOCK_BITS - 1) // _BLOCK_BITS + 1 if size else 0
        self._blocks = [0] * self._nblocks

    # -- ESN: RFC 4303 Appendix A2.2 -------------------------------------------------------
    def infer(self, seq_low: int) -> int:
        """The 64-bit sequence number a received low-order 32-bit value stands for."""
        if not self.esn:
            return seq_low
        top = self.top
        tl = top & _MASK32
        th = top >> 32
        # Without a window (anti-replay off) take the candidate nearest the top.
        w = self.size if self.size else 1 << 31
        if tl >= w - 1:
            # Case A: the window lies inside one 2^32 subspace.
            if seq_low < tl - w + 1 and th < _MASK32:
                th += 1
        else:
            # Case B: the window spans two subspaces.
            if seq_low >= ((tl - w + 1) & _MASK32) and th > 0:
                th -= 1
        return (th << 32) | seq_low

    # -- the window ----------------------------------------------------------------------
    def check(self, seq: int) -> bool:
        """True if ``seq`` is new and inside (or ahead of) the window. Does not change state."""
        if seq == 0:
            return False
        if self.size == 0:
            return True
        top = self.top
        if seq > top:
            return True
        if top - seq >= self.size:
            return False
        block = (seq >> 6) % self._nblocks
        return not (self._blocks[block] >> (seq & 63)) & 1

    def update(self, seq: int) -> None:
        """Mark ``seq`` received (call only after the ICV verified and ``check`` passed)."""
        if self.size == 0:
            if seq > self.top:
                self.top = seq
            return
        top = self.top
        if seq > top and (seq ^ top) >> 6 == 0:  # in order, same block: nothing to clear
            self.top = seq
            self._blocks[(seq >> 6) % self._nblocks] |= 1 << (seq & 63)
            return
        n = self._nblocks
        blocks = self._blocks
        if seq > top:
            top_block = top >> 6
            new_block = seq >> 6
            diff = new_block - top_block
            if diff >= n:
                for i in range(n):
                    blocks[i] = 0
            else:
                for b in range(top_block + 1, new_block + 1):
                    blocks[b % n] = 0
            self.top = seq
        idx = (seq >> 6) % n
        blocks[idx] |= 1 << (seq & 63)

    def check_and_update(self, seq: int) -> bool:
        if not self.check(seq):
            return False
        self.update(seq)
        return True

    # -- state for context transfer ------------------------------------------------------
    def snapshot(self) -> tuple[int, bytes]:
        """(top, bitmap): bit i of the bitmap (LSB of byte 0 is i = 0) is set when sequence
        number ``top - i`` was received, for i in 0 .. size-1. Canonical: bits for sequence
        numbers below 1 are always clear."""
        size = self.size
        if size == 0:
            return self.top, b""
        top = self.top
        if top == 0:  # nothing received yet (restore() and update() keep the ring empty then)
            return 0, bytes(size // 8)
        n = self._nblocks
        top_block = top >> 6
        first_block = top_block - n + 1
        # The blocks from first_block up to top_block, as one number (C-level: one pack of
        # the rotated ring, not a shift per block); blocks below 0 are empty.
        blocks = self._blocks
        if first_block >= 0:
            r = first_block % n
            ordered = blocks[r:] + blocks[:r]
        else:
            ordered = [0] * -first_block + blocks[: top_block + 1]
        acc = int.from_bytes(_words(n).pack(*ordered), "little")
        # acc holds sequence number s at bit (s - 64 * first_block); take top-size+1 .. top.
        window = (acc >> (top - size + 1 - 64 * first_block)) & ((1 << size) - 1)
        return top, window.to_bytes(size // 8, "big").translate(_REV8)

    def restore(self, top: int, bitmap: bytes) -> None:
        """Load a state made by :meth:`snapshot` (of a window of the same size)."""
        size = self.size
        if len(bitmap) != size // 8:
            raise SAError(
                f"replay bitmap has {len(bitmap)} octets, a window of {size} needs {size // 8}"
            )
        if top < 0 or top >= 1 << 64 or (not self.esn and top > _MASK32):
            raise SAError("replay window top is out of range")
        if size == 0:
            self.top = top
            return
        bits = int.from_bytes(bitmap, "little")
        if bits >> min(size, top):
            raise SAError("replay bitmap marks sequence numbers below 1")
        if top and not bits & 1:
            raise SAError("replay bitmap does not mark its own top sequence number")
        n = self._nblocks
        base = top - size + 1  # the sequence number at bit 0 of ``window``
        window = int.from_bytes(bitmap.translate(_REV8), "big")  # _reverse(bits, size)
        # Blocks first .. last hold the window; cut into 64-bit words at once (C-level) and
        # placed on the ring (block b at b % n), the others empty.
        first, last = max(base, 0) >> 6, top >> 6
        k = last - first + 1
        shift = 64 * first - base
        aligned = window >> shift if shift >= 0 else window << -shift
        words = list(_words(k).unpack((aligned & ((1 << 64 * k) - 1)).to_bytes(8 * k, "little")))
        words += [0] * (n - k)
        r = first % n
        self._blocks = words[n - r :] + words[: n - r] if r else words
        self.top = top

    def merge(self, top: int, bitmap: bytes) -> None:
        """Add a state made by :meth:`snapshot` of a window of the same size (another
        gateway's view of the same inbound SA, e.g. a transfer's source that went on
        receiving after its snapshot): afterwards every number marked in either is marked
        and the top is the higher one, so nothing either side accepted is accepted again.
        Never unmarks anything. SAError (nothing changed) if the state is malformed."""
        other = ReplayWindow(self.size, esn=self.esn)
        other.restore(top, bitmap)  # validated before anything here changes
        if self.size == 0:
            self.top = max(self.top, other.top)
            return
        # Whole bitmaps, not number by number (a full 1024-packet window was 1024 checks and
        # updates, 0.3-0.4 ms on the target between the COMMIT's arrival and activation):
        # bit i of a snapshot is top - i, so the lower window's bits move up by the
        # difference of the tops into the higher one's frame, where what falls out of the
        # window is dropped, as a number that old would be refused anyway.
        mine = self.snapshot()
        (htop, hmap), (ltop, lmap) = sorted((mine, (top, bitmap)), reverse=True)
        mask = (1 << self.size) - 1
        bits = int.from_bytes(hmap, "little") | (
            (int.from_bytes(lmap, "little") << (htop - ltop)) & mask
        )
        self.restore(htop, bits.to_bytes(self.size // 8, "little"))

    def copy(self) -> ReplayWindow:
        other = ReplayWindow(self.size, esn=self.esn)
        other.top = self.top
        other._blocks = list(self._blocks)
        return other

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, esn={self.esn}, top={self.top})"
