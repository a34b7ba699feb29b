"""Property tests of the anti-replay window (RFC 4303 §3.4.3, RFC 6479) and ESN inference
(RFC 4303 Appendix A2.2) against a reference model simple enough to be obviously right."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecct.errors import SAError
from ipsecct.ipsec.replay import ReplayWindow

SIZES = st.integers(1, 128).map(lambda n: n * 32)  # 32 .. 4096
# Steps relative to the highest accepted number: mostly near the window, sometimes far ahead.
STEPS = st.lists(
    st.one_of(
        st.integers(-300, 40),
        st.integers(-5000, 5000),
        st.integers(5000, 100_000),
        st.just(0),
    ),
    max_size=150,
)


class Model:
    """accept iff seq > 0, not seen before and seq > top - size."""

    def __init__(self, size: int, top: int = 0, seen: set[int] | None = None) -> None:
        self.size = size
        self.top = top
        self.seen: set[int] = seen if seen is not None else set()

    def accepts(self, seq: int) -> bool:
        return seq > 0 and seq not in self.seen and seq > self.top - self.size

    def accept(self, seq: int) -> None:
        self.seen.add(seq)
        self.top = max(self.top, seq)


def _run(w: ReplayWindow, m: Model, steps: list[int]) -> None:
    for d in steps:
        seq = max(0, m.top + d)
        want = m.accepts(seq)
        assert w.check(seq) is want, (seq, m.top)
        if want:
            w.update(seq)
            m.accept(seq)
        assert w.top == m.top


@settings(max_examples=200, deadline=None)
@given(size=SIZES, steps=STEPS)
def test_window_matches_model(size: int, steps: list[int]) -> None:
    w = ReplayWindow(size)
    m = Model(size)
    _run(w, m, steps)
    # everything still inside the window answers as the model does
    for seq in range(max(0, m.top - size - 3), m.top + 3):
        assert w.check(seq) is m.accepts(seq)


@settings(max_examples=200, deadline=None)
@given(size=SIZES, steps=STEPS)
def test_check_and_update_is_check_then_update(size: int, steps: list[int]) -> None:
    w = ReplayWindow(size)
    m = Model(size)
    for d in steps:
        seq = max(0, m.top + d)
        want = m.accepts(seq)
        assert w.check_and_update(seq) is want
        if want:
            m.accept(seq)


@settings(max_examples=200, deadline=None)
@given(
    size=SIZES,
    below=st.integers(0, 9000),
    steps=st.lists(st.integers(-5000, 3000), max_size=120),
)
def test_esn_inference_across_2_pow_32(size: int, below: int, steps: list[int]) -> None:
    """True 64-bit sequence numbers start just below 2^32 and cross it; the receiver sees only
    the low 32 bits. Inference must give back the true number whenever it is within the
    window's reach (top - size < seq <= top + 2^32 - size); a number from outside the reach
    gets other high bits, so its ICV (which covers them) would fail: it is never accepted."""
    start = (1 << 32) - below
    w = ReplayWindow(size, esn=True)
    w.restore(start, b"\x01" + bytes(size // 8 - 1))
    m = Model(size, start, {start})
    for d in steps:
        true = max(1, m.top + d)
        inferred = w.infer(true & 0xFFFFFFFF)
        if m.top - size < true <= m.top + (1 << 32) - size:
            assert inferred == true, (hex(true), hex(m.top))
        else:
            assert inferred != true
        want = m.accepts(true)
        icv_ok = inferred == true
        assert (w.check(inferred) and icv_ok) is want
        if want:
            w.update(inferred)
            m.accept(true)
        assert w.top == m.top
    # every step ahead was accepted (a climbing sequence does cross 2^32 when it gets there)
    assert w.top == start + sum(d for d in steps if d > 0)


def test_esn_inference_concrete_wrap() -> None:
    w = ReplayWindow(64, esn=True)
    w.restore(0xFFFF_FFF0, b"\x01" + bytes(7))
    assert w.infer(0xFFFF_FFF5) == 0xFFFF_FFF5
    assert w.infer(0x0000_0003) == 0x1_0000_0003  # past the wrap: next subspace
    w.update(0x1_0000_0003)
    assert w.infer(0xFFFF_FFF8) == 0xFFFF_FFF8  # still in the window: previous subspace
    assert w.check(0xFFFF_FFF8)
    assert not w.check(0x1_0000_0003)
    assert w.infer(0x0000_0010) == 0x1_0000_0010


@settings(max_examples=200, deadline=None)
@given(size=SIZES, steps=STEPS, probes=STEPS, esn=st.booleans())
def test_snapshot_restore_round_trip(
    size: int, steps: list[int], probes: list[int], esn: bool
) -> None:
    w = ReplayWindow(size, esn=esn)
    _run(w, Model(size), steps)
    top, bitmap = w.snapshot()
    assert len(bitmap) == size // 8
    other = ReplayWindow(size, esn=esn)
    other.restore(top, bitmap)
    assert other.snapshot() == (top, bitmap)
    for seq in range(max(0, top - size - 2), top + 3):
        assert other.check(seq) is w.check(seq)
    # from here on both behave alike
    for d in probes:
        seq = max(0, w.top + d)
        a = w.check_and_update(seq)
        assert other.check_and_update(seq) is a
    assert other.snapshot() == w.snapshot()


def test_snapshot_layout() -> None:
    w = ReplayWindow(32)
    for seq in (1, 2, 5, 40):
        w.check_and_update(seq)
    top, bitmap = w.snapshot()
    assert top == 40
    bits = int.from_bytes(bitmap, "little")
    assert bits == 1  # 1, 2, 5 fell out of the 32-wide window below 40
    w.check_and_update(39)
    w.check_and_update(9)
    assert int.from_bytes(w.snapshot()[1], "little") == 0b11 | 1 << 31


@pytest.mark.parametrize(
    ("size", "esn", "top", "bitmap"),
    [
        (64, False, 10, bytes(7)),  # too short
        (64, False, 10, b"\x01" + bytes(8)),  # too long
        (64, False, 10, bytes(8)),  # top itself not marked
        (64, False, 3, bytes([0b10001]) + bytes(7)),  # marks sequence number -1
        (64, False, 0, b"\x01" + bytes(7)),  # marks sequence number 0
        (64, False, 1 << 32, b"\x01" + bytes(7)),  # above a 32-bit counter
        (64, True, 1 << 64, b"\x01" + bytes(7)),  # above a 64-bit counter
        (64, False, -1, b"\x01" + bytes(7)),
        (32, False, 100, b"\x01" + bytes(7)),  # bitmap of another window size
    ],
)
def test_restore_rejects_malformed_state(size: int, esn: bool, top: int, bitmap: bytes) -> None:
    w = ReplayWindow(size, esn=esn)
    w.check_and_update(7)
    before = w.snapshot()
    with pytest.raises(SAError):
        w.restore(top, bitmap)
    assert w.snapshot() == before  # a refused state leaves the window as it was


@settings(max_examples=200, deadline=None)
@given(size=SIZES, top=st.integers(0, 1 << 40), data=st.binary(min_size=0, max_size=520))
def test_restore_never_accepts_what_snapshot_cannot_produce(
    size: int, top: int, data: bytes
) -> None:
    w = ReplayWindow(size, esn=True)
    n = size // 8
    bitmap = (data * (n // max(1, len(data)) + 1))[:n] if data else bytes(n)
    try:
        w.restore(top, bitmap)
    except SAError:
        return
    assert w.snapshot() == (top, bitmap)  # canonical: what was accepted re-reads the same


@given(
    size=st.sampled_from([32, 64, 96, 1024, 4096]),
    data=st.data(),
)
def test_octet_bit_reversal_is_the_reference_reversal(size: int, data: st.DataObject) -> None:
    """snapshot/restore reverse the window's bits octet-wise (_REV8); the reference reverses
    them as a string of binary digits: same bits either way, both directions."""
    from ipsecct.ipsec.replay import _REV8, _reverse

    x = data.draw(st.integers(min_value=0, max_value=(1 << size) - 1))
    fast = x.to_bytes(size // 8, "big").translate(_REV8)
    assert fast == _reverse(x, size).to_bytes(size // 8, "little")
    assert int.from_bytes(fast.translate(_REV8), "big") == x


# The ring <-> bitmap conversions before they were cut into words at once (a shift per block):
# the reference that snapshot() and restore() must match exactly.
def _snapshot_by_blocks(w: ReplayWindow) -> tuple[int, int]:
    n, top = w._nblocks, w.top
    first_block = (top >> 6) - n + 1
    acc = 0
    for b in range(top >> 6, first_block - 1, -1):
        acc = (acc << 64) | (w._blocks[b % n] if b >= 0 else 0)
    return top, (acc >> (top - w.size + 1 - 64 * first_block)) & ((1 << w.size) - 1)


def _blocks_by_shifts(size: int, top: int, window: int) -> list[int]:
    n = (size + 63) // 64 + 1
    blocks = [0] * n
    base = top - size + 1
    for b in range(max(base, 0) >> 6, (top >> 6) + 1):
        lo = 64 * b - base
        blocks[b % n] = (window >> lo if lo >= 0 else window << -lo) & ((1 << 64) - 1)
    return blocks


@settings(max_examples=300, deadline=None)
@given(size=SIZES, steps=STEPS, esn=st.booleans(), far=st.integers(0, 1 << 40))
def test_snapshot_and_restore_match_the_block_by_block_reference(
    size: int, steps: list[int], esn: bool, far: int
) -> None:
    from ipsecct.ipsec.replay import _REV8

    w = ReplayWindow(size, esn=True)
    if far:  # the ring at any rotation, not only near sequence number 1
        w.restore(far, b"\x01" + bytes(size // 8 - 1))
    _run(w, Model(size, far, {far}) if far else Model(size), steps)
    top, bitmap = w.snapshot()
    ref_top, ref_window = _snapshot_by_blocks(w)
    assert top == ref_top
    assert int.from_bytes(bitmap.translate(_REV8), "big") == ref_window
    other = ReplayWindow(size, esn=True)
    other.restore(top, bitmap)
    assert other._blocks == _blocks_by_shifts(size, top, ref_window)


@pytest.mark.parametrize("size", [32, 64, 1024, 4096])
def test_snapshot_of_a_window_that_received_nothing(size: int) -> None:
    """snapshot() answers a fresh window (and one restored to top 0) without the ring's
    conversion: the same as the block-by-block reference, and restorable."""
    for w in (ReplayWindow(size, esn=True), ReplayWindow(size)):
        assert w.snapshot() == (0, bytes(size // 8)) and _snapshot_by_blocks(w) == (0, 0)
        w.restore(0, bytes(size // 8))
        assert w.snapshot() == (0, bytes(size // 8))
        w.update(1)
        assert w.snapshot() == (1, b"\x01" + bytes(size // 8 - 1))
