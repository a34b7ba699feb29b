"""The Security Association Database (sad.py): SA validation, the SAD's lookup domain, SPI
allocation, sequence numbers, lifetimes and key hygiene in reprs."""

from __future__ import annotations

import ipaddress
import itertools

import pytest

from ipsecct.errors import AlgorithmError, SAError, SPICollisionError
from ipsecct.ipsec.algorithms import EncAlg, IntegAlg
from ipsecct.ipsec.sad import (
    MAX_SEQ_32,
    MAX_SEQ_64,
    SAD,
    Direction,
    IVMode,
    Lifetime,
    Protocol,
    SAEvent,
    SecurityAssociation,
)

ip = ipaddress.ip_address
A, B, C = ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3")
GCM_KEY = bytes(range(0xA0, 0xA0 + 20))
CBC_KEY = bytes(range(0x30, 0x40))
HMAC_KEY = bytes(range(0xC0, 0xE0))


def gcm(
    spi: int = 0x1000, dst: ipaddress.IPv4Address | ipaddress.IPv6Address = B, **kw: object
) -> SecurityAssociation:
    src = A if dst.version == 4 else ip("2001:db8::1")
    return SecurityAssociation(spi, Direction.INBOUND, src, dst, enc_key=GCM_KEY, **kw)  # type: ignore[arg-type]


def cbc(spi: int = 0x1000, **kw: object) -> SecurityAssociation:
    args: dict[str, object] = dict(
        enc=EncAlg.AES_CBC, enc_key=CBC_KEY, integ=IntegAlg.HMAC_SHA2_256_128, integ_key=HMAC_KEY
    )
    args.update(kw)
    return SecurityAssociation(spi, Direction.OUTBOUND, A, B, **args)  # type: ignore[arg-type]


def ah_sa(spi: int = 0x1000, **kw: object) -> SecurityAssociation:
    args: dict[str, object] = dict(
        protocol=Protocol.AH,
        enc=EncAlg.NULL,
        integ=IntegAlg.HMAC_SHA2_256_128,
        integ_key=HMAC_KEY,
    )
    args.update(kw)
    return SecurityAssociation(spi, Direction.OUTBOUND, A, B, **args)  # type: ignore[arg-type]


# -- SA validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("spi", [0, 1, 100, 255, 2**32, -1])
def test_reserved_or_out_of_range_spi_refused(spi: int) -> None:
    with pytest.raises(SAError):
        gcm(spi)


@pytest.mark.parametrize("spi", [256, 0xFFFFFFFF])
def test_spi_bounds_accepted(spi: int) -> None:
    assert gcm(spi).spi == spi


def test_sa_field_checks() -> None:
    with pytest.raises(SAError):
        SecurityAssociation(0x1000, Direction.INBOUND, A, ip("::1"), enc_key=GCM_KEY)
    for mtu in (67, 65536):
        with pytest.raises(SAError):
            gcm(path_mtu=mtu)
    with pytest.raises(SAError):
        gcm(seq=MAX_SEQ_32 + 1)
    assert gcm(seq=MAX_SEQ_32 + 1, esn=True).seq == MAX_SEQ_32 + 1
    with pytest.raises(SAError):
        gcm(seq=MAX_SEQ_64 + 1, esn=True)
    with pytest.raises(SAError):
        gcm(seq=-1)
    with pytest.raises(SAError):
        gcm(replay_window=48)  # not a multiple of 32
    assert gcm(replay_window=4096).window.size == 4096
    assert gcm(replay_window=0).window.size == 0


def test_algorithm_checks() -> None:
    with pytest.raises(AlgorithmError):  # AEAD with an integrity algorithm
        SecurityAssociation(
            0x1000,
            Direction.INBOUND,
            A,
            B,
            enc_key=GCM_KEY,
            integ=IntegAlg.HMAC_SHA2_256_128,
            integ_key=HMAC_KEY,
        )
    with pytest.raises(AlgorithmError):  # CBC without integrity
        SecurityAssociation(0x1000, Direction.INBOUND, A, B, enc=EncAlg.AES_CBC, enc_key=CBC_KEY)
    with pytest.raises(AlgorithmError):  # wrong key length
        SecurityAssociation(0x1000, Direction.INBOUND, A, B, enc_key=GCM_KEY[:16])
    with pytest.raises(AlgorithmError):
        cbc(integ_key=HMAC_KEY[:20])
    # AH: no encryption, an integrity algorithm with the right key length
    with pytest.raises(AlgorithmError):
        SecurityAssociation(
            0x1000,
            Direction.INBOUND,
            A,
            B,
            protocol=Protocol.AH,
            enc=EncAlg.AES_CBC,
            enc_key=CBC_KEY,
            integ=IntegAlg.HMAC_SHA2_256_128,
            integ_key=HMAC_KEY,
        )
    with pytest.raises(AlgorithmError):
        SecurityAssociation(0x1000, Direction.INBOUND, A, B, protocol=Protocol.AH, enc=EncAlg.NULL)
    with pytest.raises(AlgorithmError):
        ah_sa(integ_key=HMAC_KEY[:16])


def test_derived_properties() -> None:
    g, c, h = gcm(), cbc(), ah_sa()
    assert g.key == (B, Protocol.ESP, 0x1000)
    assert h.key == (B, Protocol.AH, 0x1000)
    assert (g.aead, c.aead, h.aead) == (True, False, False)
    assert (g.iv_mode, c.iv_mode, h.iv_mode) == (IVMode.SEQUENCE, IVMode.RANDOM, IVMode.NONE)
    null = SecurityAssociation(
        0x1000,
        Direction.INBOUND,
        A,
        B,
        enc=EncAlg.NULL,
        integ=IntegAlg.HMAC_SHA1_96,
        integ_key=bytes(20),
    )
    assert null.iv_mode is IVMode.NONE
    assert g.seq_limit == MAX_SEQ_32 and gcm(esn=True).seq_limit == MAX_SEQ_64
    assert gcm(esn=True).window.esn and not g.window.esn
    with pytest.raises(AssertionError):
        _ = h.transform  # AH SAs have no ESP transform
    assert g.transform.icv_len == 16
    assert "0x00001000" in g.describe() and "ESP" in g.describe()


def test_pmtu_aging() -> None:
    sa = gcm(path_mtu=1400, pmtu_expires=100.0)
    assert sa.effective_mtu(99.0) == 1400
    assert sa.effective_mtu(100.0) == 1500
    assert sa.pmtu_expires is None
    assert sa.effective_mtu(1e9, default=9000) == 1500  # reverted once, stays


# -- the SAD ---------------------------------------------------------------------------------
def test_sad_add_lookup_remove() -> None:
    sad = SAD()
    s1, s2 = gcm(0x1000), gcm(0x2000)
    h = ah_sa(0x1000)  # same SPI and destination, other protocol: another domain
    other_dst = gcm(0x1000, dst=C)
    v6 = gcm(0x1000, dst=ip("2001:db8::2"))
    for sa in (s1, s2, h, other_dst, v6):
        sad.add(sa)
    assert len(sad) == 5 and set(sad) == {s1, s2, h, other_dst, v6}
    assert sad.lookup(B, Protocol.ESP, 0x1000) is s1
    assert sad.lookup(B, Protocol.AH, 0x1000) is h
    assert sad.lookup(C, Protocol.ESP, 0x1000) is other_dst
    assert sad.lookup(ip("2001:db8::2"), Protocol.ESP, 0x1000) is v6
    assert sad.lookup(B, Protocol.ESP, 0x3000) is None
    assert sad.lookup(A, Protocol.ESP, 0x1000) is None  # the source is not part of the key
    assert sad.in_use(B, Protocol.ESP, 0x2000) and not sad.in_use(C, Protocol.ESP, 0x2000)
    sad.remove(s1)
    assert sad.lookup(B, Protocol.ESP, 0x1000) is None and len(sad) == 4
    with pytest.raises(SAError):
        sad.remove(s1)  # not there any more
    # an equal-looking SA that is not the stored object is refused
    with pytest.raises(SAError):
        sad.remove(gcm(0x2000))
    assert sad.lookup(B, Protocol.ESP, 0x2000) is s2
    assert not sad.discard(gcm(0x2000)) and sad.lookup(B, Protocol.ESP, 0x2000) is s2
    assert sad.lookup_spi(Protocol.ESP, 0x2000) is s2
    assert sad.discard(s2) and not sad.discard(s2) and not sad.in_use(B, Protocol.ESP, 0x2000)
    assert sad.lookup_spi(Protocol.ESP, 0x2000) is None
    # iteration is a snapshot: removing while iterating is safe
    for sa in sad:
        sad.remove(sa)
    assert len(sad) == 0


def test_spi_collision() -> None:
    sad = SAD()
    first = gcm(0x4242)
    sad.add(first)
    with pytest.raises(SPICollisionError) as exc:
        sad.add(cbc(0x4242))  # other algorithms, same (dst, ESP, SPI)
    assert "0x00004242" in str(exc.value)
    assert isinstance(exc.value, SAError)
    assert sad.lookup(B, Protocol.ESP, 0x4242) is first
    with pytest.raises(SPICollisionError):
        sad.add(first)  # the same object twice
    assert len(sad) == 1


def test_ipv4_and_ipv6_destinations_with_equal_integers_are_different_keys() -> None:
    # The SAD keys an IPv4 destination by its integer: ::c000:202 has the same integer as
    # 192.0.2.2 (B), and 1.0.0.1 and ::1.0.0.1 likewise; neither pair may collide or be found
    # under the other.
    sad = SAD()
    v4, v6 = gcm(0x6000), gcm(0x6000, dst=ip("::c000:202"))
    assert int(v4.dst) == int(v6.dst)
    sad.add(v4)
    assert not sad.in_use(ip("::c000:202"), Protocol.ESP, 0x6000)
    assert sad.lookup(ip("::c000:202"), Protocol.ESP, 0x6000) is None
    sad.add(v6)
    assert sad.lookup(B, Protocol.ESP, 0x6000) is v4
    assert sad.lookup(ip("::c000:202"), Protocol.ESP, 0x6000) is v6
    assert sad.lookup(ip("192.0.2.2"), Protocol.ESP, 0x6000) is v4  # an equal, other object
    assert sad.discard(v4) and sad.lookup(ip("::c000:202"), Protocol.ESP, 0x6000) is v6
    assert not sad.in_use(B, Protocol.ESP, 0x6000) and sad.discard(v6) and len(sad) == 0


def test_lookup_spi() -> None:
    sad = SAD()
    one = gcm(0x5000)
    sad.add(one)
    assert sad.lookup_spi(Protocol.ESP, 0x5000) is one
    assert sad.lookup_spi(Protocol.AH, 0x5000) is None
    assert sad.lookup_spi(Protocol.ESP, 0x5001) is None
    twin = gcm(0x5000, dst=C)
    sad.add(twin)
    assert sad.lookup_spi(Protocol.ESP, 0x5000) is None  # ambiguous: use the full key
    sad.remove(one)
    assert sad.lookup_spi(Protocol.ESP, 0x5000) is twin
    sad.remove(twin)
    assert sad.lookup_spi(Protocol.ESP, 0x5000) is None


def test_free_spi() -> None:
    sad = SAD()
    sad.add(gcm(0x100))
    sad.add(gcm(0x101))
    # reserved candidates are skipped, used ones too
    assert sad.free_spi(B, Protocol.ESP, iter([0, 5, 255, 0x100, 0x101, 0x102])) == 0x102
    assert sad.free_spi(B, Protocol.AH, iter([0x100])) == 0x100  # other protocol
    assert sad.free_spi(C, Protocol.ESP, iter([0x100])) == 0x100  # other destination
    with pytest.raises(SAError):
        sad.free_spi(B, Protocol.ESP, iter([1, 0x100, 0x101, 2**32]))
    assert sad.free_spi(B, Protocol.ESP, itertools.count(0)) == 0x102


# -- sequence numbers ------------------------------------------------------------------------
def test_next_seq_32_bit_stops_at_limit() -> None:
    sa = gcm(seq=MAX_SEQ_32 - 2)
    assert sa.next_seq() == MAX_SEQ_32 - 1
    assert sa.next_seq() == MAX_SEQ_32
    assert sa.next_seq() is None
    assert sa.next_seq() is None
    assert sa.seq == MAX_SEQ_32
    assert gcm(seq=MAX_SEQ_32).next_seq() is None


def test_next_seq_starts_at_one() -> None:
    sa = cbc()
    assert [sa.next_seq() for _ in range(3)] == [1, 2, 3]


def test_next_seq_esn_crosses_2_32_and_stops_at_2_64() -> None:
    sa = gcm(esn=True, seq=MAX_SEQ_32 - 1)
    assert [sa.next_seq() for _ in range(3)] == [MAX_SEQ_32, 2**32, 2**32 + 1]
    top = gcm(esn=True, seq=MAX_SEQ_64 - 1)
    assert top.next_seq() == MAX_SEQ_64
    assert top.next_seq() is None


def test_overflow_permitted_rolls_over_only_for_non_aead_non_esn() -> None:
    c = cbc(seq=MAX_SEQ_32, overflow_permitted=True)
    assert c.next_seq() == 1 and c.next_seq() == 2
    h = ah_sa(seq=MAX_SEQ_32, overflow_permitted=True)
    assert h.next_seq() == 1
    assert gcm(seq=MAX_SEQ_32, overflow_permitted=True).next_seq() is None  # AEAD: IV reuse
    assert cbc(seq=MAX_SEQ_64, esn=True, overflow_permitted=True).next_seq() is None
    assert cbc(seq=MAX_SEQ_32, overflow_permitted=False).next_seq() is None


def test_seq_near_limit_event_once() -> None:
    near = MAX_SEQ_32 - (MAX_SEQ_32 >> 3)
    sa = cbc(seq=near - 2)
    sa.next_seq()
    assert sa.events == []
    sa.next_seq()
    assert sa.events == [SAEvent.SEQ_NEAR_LIMIT]
    for _ in range(5):
        sa.next_seq()
    assert sa.events == [SAEvent.SEQ_NEAR_LIMIT]


# -- lifetimes -------------------------------------------------------------------------------
def test_soft_and_hard_by_packets_fire_once() -> None:
    sa = gcm(soft=Lifetime(packets=3), hard=Lifetime(packets=5))
    for _ in range(2):
        sa.account(100, 0.0)
    assert sa.events == [] and not sa.soft_fired
    sa.account(100, 0.0)
    assert sa.events == [SAEvent.SOFT_EXPIRED] and sa.soft_fired and not sa.dead
    sa.account(100, 0.0)
    assert not sa.expired(0.0)
    sa.account(100, 0.0)
    assert sa.events == [SAEvent.SOFT_EXPIRED, SAEvent.HARD_EXPIRED]
    assert sa.dead and sa.expired(0.0)
    for _ in range(3):
        sa.account(100, 0.0)
    assert sa.events == [SAEvent.SOFT_EXPIRED, SAEvent.HARD_EXPIRED]
    assert (sa.counters.packets, sa.counters.bytes) == (8, 800)


def test_soft_and_hard_by_bytes() -> None:
    sa = gcm(soft=Lifetime(bytes=1000), hard=Lifetime(bytes=2000))
    sa.account(999, 0.0)
    assert sa.events == []
    sa.account(1, 0.0)
    assert sa.events == [SAEvent.SOFT_EXPIRED]
    sa.account(999, 0.0)
    assert not sa.dead
    sa.account(1, 0.0)
    assert sa.events == [SAEvent.SOFT_EXPIRED, SAEvent.HARD_EXPIRED] and sa.dead


def test_soft_and_hard_by_time_via_poll() -> None:
    sa = gcm(created=100.0, soft=Lifetime(seconds=10.0), hard=Lifetime(seconds=20.0))
    sa.poll(109.9)
    assert sa.events == []
    sa.poll(110.0)
    assert sa.events == [SAEvent.SOFT_EXPIRED]
    sa.poll(115.0)
    assert sa.events == [SAEvent.SOFT_EXPIRED]
    assert not sa.expired(119.0)
    sa.poll(120.0)
    assert sa.events == [SAEvent.SOFT_EXPIRED, SAEvent.HARD_EXPIRED]
    sa.poll(130.0)
    assert sa.events.count(SAEvent.HARD_EXPIRED) == 1
    assert sa.counters.packets == 0  # polling counts no packets


def test_hard_time_limit_makes_sa_unusable() -> None:
    sa = gcm(created=0.0, hard=Lifetime(seconds=60.0))
    assert not sa.expired(59.9)
    assert sa.expired(60.0)
    assert sa.dead
    assert sa.expired(0.0)  # dead stays dead


def test_no_limits_no_events() -> None:
    sa = gcm()
    for i in range(100):
        sa.account(1500, float(i) * 1e6)
    sa.poll(1e12)
    assert sa.events == [] and not sa.dead and not sa.expired(1e12)
    assert Lifetime().unlimited and not Lifetime(packets=1).unlimited


def test_poll_does_not_fire_packet_limits_early() -> None:
    sa = gcm(soft=Lifetime(packets=3))
    sa.account(10, 0.0)
    sa.account(10, 0.0)
    sa.poll(1.0)
    assert sa.events == []


def test_hard_time_expiry_found_by_expired_fires_event_once() -> None:
    sa = gcm(hard=Lifetime(seconds=10.0))
    assert sa.expired(11.0)
    sa.poll(12.0)
    assert sa.events == [SAEvent.HARD_EXPIRED]


# -- key hygiene -----------------------------------------------------------------------------
@pytest.mark.parametrize("make", [gcm, cbc, ah_sa])
def test_repr_never_contains_key_material(make: object) -> None:
    sa = make()  # type: ignore[operator]
    sad = SAD()
    sad.add(sa)
    texts = [repr(sa), str(sa), sa.describe(), repr(sad), repr(sa.window)]
    if sa.protocol is Protocol.ESP:
        texts.append(repr(sa.transform))
    for key in (sa.enc_key, sa.integ_key):
        if not key:
            continue
        for t in texts:
            assert key.hex() not in t
            assert key.hex().upper() not in t
            assert repr(key) not in t
            assert key[:8].hex() not in t  # not even a prefix
            assert str(list(key[:8]))[1:-1] not in t
    assert "enc_key" not in repr(sa) and "integ_key" not in repr(sa)
    assert f"spi={sa.spi}" in repr(sa)  # the repr is still useful


def test_users_of_a_key_follow_every_add_and_remove() -> None:
    """INVARIANT (sa add's check: one AEAD key both ways repeats nonces). The index of SAs
    by a keyed hash of their key is built on the first question and kept with later adds
    and removes (the one SA itself left out); a CBC key is never asked about."""
    sad = SAD()
    first = gcm(0x1001)
    sad.add(first)
    out = SecurityAssociation(0x2002, Direction.OUTBOUND, B, A, enc_key=GCM_KEY)
    assert sad.users_of_key(out) == [first]  # built now, from what was added before
    sad.add(out)
    other = SecurityAssociation(0x1003, Direction.INBOUND, A, B, enc_key=bytes(20))
    sad.add(other)  # another key
    assert sad.users_of_key(first) == [out]
    assert sad.users_of_key(other) == []
    sad.remove(first)
    assert sad.users_of_key(out) == []
    sad.add(first)
    assert sad.users_of_key(out) == [first]
    assert sad.users_of_key(cbc(0x3003)) == []
    shown = repr(sad.__dict__)  # (the index holds hashes: no key in the clear)
    assert repr(GCM_KEY)[2:-1] not in shown and GCM_KEY.hex() not in shown
