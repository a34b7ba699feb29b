"""RFC 6311 message-ID synchronisation, sans I/O: the codec of the four notifies, their
negotiation in IKE_AUTH, and the INFORMATIONAL exchange (message ID 0) that a gateway which
took over an IKE SA from a stale replica runs with the peer, in both roles (our engine as the
peer answers like strongSwan's ``ike_mid_sync.c``). Without RFC 6311 the taker keeps the
replicated IDs and accepts the peer's next request a little ahead of them."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipsecct.errors import IkeParseError
from ipsecct.ikev2 import context
from ipsecct.ikev2 import message as M
from ipsecct.ikev2.engine import (
    MAX_REPLAY_DELTA,
    MID_SYNC_LEAP,
    RESYNC_AHEAD,
    IkeEngine,
    ReplayCounterSynced,
    Send,
)
from ipsecct.ikev2.ikesa import IkeSA
from ipsecct.ikev2.mid_sync import MidSync, ReplayCounterSync, sync_request
from ipsecct.ipsec.sad import SAEvent
from tests.helpers.contexts import make_sa
from tests.helpers.ikev2_engines import I500, R500, Wire, conn, connect, mn_conn, pair

N = M.Notify
GCM = "aes128gcm16-prfsha256-x25519"
CBC = "aes128-sha256-x25519"


# -- codec ---------------------------------------------------------------------------------------


def test_mid_sync_notify_layout() -> None:
    p = MidSync(b"\x01\x02\x03\x04", 7, 0x01020304).payload()
    assert (p.type, p.protocol, p.spi) == (16422, 0, b"")
    assert p.data == b"\x01\x02\x03\x04" + struct.pack("!II", 7, 0x01020304)
    # through the IKE payload codec and back
    (q,) = M.decode_payloads(M.encode_payloads([p]), M.PayloadType.NOTIFY)
    assert isinstance(q, M.NotifyPayload)
    assert MidSync.parse(q) == MidSync(b"\1\2\3\4", 7, 0x01020304)
    r = ReplayCounterSync(16384).payload()
    assert (r.type, r.data) == (16423, struct.pack("!Q", 16384))
    assert ReplayCounterSync.parse(r).delta == 16384
    assert ReplayCounterSync.parse(M.NotifyPayload(16423, data=struct.pack("!I", 9))).delta == 9
    assert N.IKEV2_MESSAGE_ID_SYNC_SUPPORTED.value == 16420
    assert N.IPSEC_REPLAY_COUNTER_SYNC_SUPPORTED.value == 16421
    with pytest.raises(ValueError, match="4 octets"):
        MidSync(b"\0" * 8, 1, 1).payload()


@pytest.mark.parametrize(
    "bad",
    [
        M.NotifyPayload(16422, data=b"\0" * 11),
        M.NotifyPayload(16422, data=b"\0" * 13),
        M.NotifyPayload(16422, protocol=1, data=b"\0" * 12),
        M.NotifyPayload(16422, spi=b"\0" * 4, data=b"\0" * 12),
        M.NotifyPayload(16423, data=b"\0" * 12),
    ],
)
def test_malformed_sync_notifies_raise_parse_errors(bad: M.NotifyPayload) -> None:
    with pytest.raises(IkeParseError):
        sync_request([bad])


def test_sync_request_holds_only_sync_notifies() -> None:
    mid = MidSync(b"abcd", 5, 6).payload()
    assert sync_request([mid]) == (MidSync(b"abcd", 5, 6), None)
    assert sync_request([mid, ReplayCounterSync(3).payload()]) == (
        MidSync(b"abcd", 5, 6), ReplayCounterSync(3))  # fmt: skip
    assert sync_request([]) is None  # an empty INFORMATIONAL is a liveness check
    assert sync_request([mid, M.NotifyPayload(N.INITIAL_CONTACT)]) is None
    with pytest.raises(IkeParseError):
        sync_request([mid, mid])
    with pytest.raises(IkeParseError):
        sync_request([ReplayCounterSync(3).payload()])


@given(st.binary(max_size=20), st.sampled_from([16422, 16423]), st.integers(0, 3))
def test_fuzz_sync_notifies(data: bytes, ntype: int, proto: int) -> None:
    try:
        got = sync_request([M.NotifyPayload(ntype, protocol=proto, data=data)])
    except IkeParseError:
        return
    assert got is not None and len(data) == 12 and proto == 0


# -- negotiation --------------------------------------------------------------------------------


def test_negotiated_in_ike_auth_and_carried_in_the_context() -> None:
    w = pair()
    connect(w)
    (ii,), (ir,) = w.ini.ike_sas(), w.resp.ike_sas()
    assert ii.mid_sync and ir.mid_sync
    # the initiator announces replay-counter sync too (it takes it as the peer), the
    # responder answers it
    assert ii.replay_sync and ir.replay_sync
    moved = IkeEngine([conn()]).import_ike(context.encode(ir, 1.0), 1.0)
    assert moved.mid_sync and moved.replay_sync


# -- the exchange after a fail-over ----------------------------------------------------------


def _stale_takeover(dpd_by_gateway: bool = True, *, before: int = 0, ike: str = GCM,
                    ) -> tuple[Wire, IkeEngine, IkeSA, list[bytes]]:  # fmt: skip
    """sg1 (w.resp) replicates its IKE SA (after ``before`` liveness checks of its own), then
    answers a liveness check of the MN and sends one of its own after the replication
    (``dpd_by_gateway``: 1, or that many), and dies: sg2 holds a replica whose message IDs are
    behind in both directions."""
    w = pair(mn_conn(dpd=10, ike=ike), conn(dpd=10, ike=ike))
    connect(w)
    (ir,) = w.resp.ike_sas()
    for i in range(before):
        w.deliver(w.resp.liveness(ir, 2.0 + i), "r", 2.0 + i)
    replica = context.encode(ir, 5.0)
    w.deliver(w.ini.tick(10.0), "i", 10.0)  # the MN's liveness check, answered by sg1
    for i in range(int(dpd_by_gateway)):
        w.deliver(w.resp.liveness(ir, 11.0 + i / 10), "r", 11.0 + i / 10)  # answered by the MN
    sg2 = IkeEngine([conn(dpd=10, ike=ike)])
    imported = sg2.import_ike(replica, 12.0)
    return w, sg2, imported, replica


def test_taker_synchronises_message_ids_with_the_peer() -> None:
    w, sg2, ike, _ = _stale_takeover()
    (ii,) = w.ini.ike_sas()
    assert (ike.my_next_mid, ike.peer_next_mid) == (0, 2)  # replica: before both exchanges
    assert (ii.peer_next_mid, ii.my_next_mid) == (1, 3)
    # with the replica's IDs the MN would ignore sg2's request and sg2 the MN's
    out = sg2.start_mid_sync(ike, 12.0)
    (req,) = out
    assert isinstance(req, Send) and struct.unpack_from("!I", req.data, 20)[0] == 0  # MID 0
    w2 = Wire(w.ini, sg2)
    w2.deliver(out, "r", 12.0)
    assert w.ini.stats["mid-sync-answered"] == 1 and sg2.stats["mid-sync-done"] == 1
    # M2 = max(M1, expected) = replica + leap; P2 = the MN's next request
    assert ike.my_next_mid == ii.peer_next_mid == MID_SYNC_LEAP
    assert ike.peer_next_mid == ii.my_next_mid == 3
    # now both directions work with sg2: liveness checks, IKE and CHILD rekeys
    w2.deliver(sg2.liveness(ike, 13.0), "r", 13.0)
    w2.deliver(w.ini.liveness(ii, 14.0), "i", 14.0)
    assert sg2.stats["liveness-answered"] == 1 and ike.pending is None and ii.pending is None
    w2.deliver(sg2.rekey_ike(ike, 15.0), "r", 15.0)
    (new,) = sg2.ike_sas()
    w2.deliver(w.ini.rekey_child(w.ini.ike_sas()[0], w.ini.ike_sas()[0].children[0], 16.0),
               "i", 16.0)  # fmt: skip
    assert sg2.stats["ike-sa-rekeyed"] == 1 and sg2.stats["child-sa-rekeyed"] == 1
    assert new.mid_sync and w.ini.stats["unknown-spi"] == w.ini.stats["bad-message-id"] == 0


def test_peers_request_in_flight_is_sent_again_under_the_new_id() -> None:
    """The MN's liveness check went to the dead sg1: after the sync it goes again, under the
    message ID the MN announced (strongSwan re-queues its active task the same way)."""
    w, sg2, ike, _ = _stale_takeover(dpd_by_gateway=False)
    (ii,) = w.ini.ike_sas()
    lost = w.ini.liveness(ii, 12.0)
    assert lost and ii.pending is not None  # sent, never answered
    w2 = Wire(w.ini, sg2)
    w2.deliver(sg2.start_mid_sync(ike, 13.0), "r", 13.0)
    assert ii.pending is None and sg2.stats["liveness-answered"] == 1
    # IKE_AUTH was 1, the answered check 2, the lost one 3, sent again as 4: next is 5
    assert ike.peer_next_mid == ii.my_next_mid == 5


def test_stale_and_repeated_sync_requests() -> None:
    w, sg2, ike, _ = _stale_takeover()
    (ii,) = w.ini.ike_sas()
    # a sync below what the MN expects from the cluster is dropped without an answer
    out = sg2.start_mid_sync(ike, 12.0, leap=0)
    assert [o for o in out if isinstance(o, Send)]
    answers = w.ini.receive(out[0].data, R500, I500, 12.0)  # type: ignore[union-attr]
    assert answers == [] and w.ini.stats["mid-sync-stale"] == 1
    # retransmitted with back-off, then the peer is declared dead
    assert sg2.next_deadline() == 14.0
    assert len(sg2.tick(14.0)) == 1 and sg2.stats["retransmitted"] == 1
    # a proper one; its retransmission (the answer was lost) is answered the same way
    ike.pending = None
    out = sg2.start_mid_sync(ike, 20.0)
    first = w.ini.receive(out[0].data, R500, I500, 20.0)  # type: ignore[union-attr]
    again = w.ini.receive(out[0].data, R500, I500, 21.0)  # type: ignore[union-attr]
    assert len(first) == len(again) == 1 and w.ini.stats["mid-sync-answered"] == 2
    Wire(w.ini, sg2).deliver([], "i")
    sg2.receive(again[0].data, I500, R500, 21.0)  # type: ignore[union-attr]
    assert sg2.stats["mid-sync-done"] == 1 and ike.my_next_mid == ii.peer_next_mid


def test_a_forged_answer_is_not_taken() -> None:
    w, sg2, ike, _ = _stale_takeover()
    out = sg2.start_mid_sync(ike, 12.0)
    assert ike.pending is not None and ike.pending.mid_sync is not None
    nonce = ike.pending.mid_sync[0]
    # an answer with another nonce (authentic, but not to this request) changes nothing
    hdr = M.Header(ike.spi_i, ike.spi_r, 0, M.ExchangeType.INFORMATIONAL, M.Flag.RESPONSE
                   | M.Flag.INITIATOR, 0, 0)  # fmt: skip
    bogus = MidSync(bytes(b ^ 0xFF for b in nonce), 1000, 1000).payload()
    (ii,) = w.ini.ike_sas()
    sg2.receive(ii.outbound.seal(hdr, [bogus]), I500, R500, 12.5)
    assert sg2.stats["mid-sync-failed"] == 1 and ike.peer_next_mid == 2
    assert ike.my_next_mid == MID_SYNC_LEAP  # never below what we announced
    assert out


def test_without_rfc_6311_the_peers_next_request_may_be_a_little_ahead() -> None:
    w, sg2, ike, _ = _stale_takeover(dpd_by_gateway=False)
    ike.mid_sync = False  # a peer that did not announce it
    (check,) = sg2.start_mid_sync(ike, 12.0)  # a liveness check at once, under the replica's ID
    assert ike.resync_ahead == ike.probe_ahead == RESYNC_AHEAD
    assert sg2.stats["mid-sync-unsupported"] == 1
    (ii,) = w.ini.ike_sas()
    w2 = Wire(w.ini, sg2)
    w2.deliver([check], "r", 12.0)
    assert sg2.stats["liveness-ok"] == 1 and ike.probe_ahead == 0
    w2.deliver(w.ini.liveness(ii, 13.0), "i", 13.0)  # ID 2; the replica expects 1
    assert sg2.stats["message-id-resynced"] == 1 and sg2.stats["liveness-answered"] == 1
    assert ike.resync_ahead == 0 and ii.pending is None
    # only once: from now on the IDs are exact again
    ii.my_next_mid += 5
    w2.deliver(w.ini.liveness(ii, 14.0), "i", 14.0)
    assert sg2.stats["bad-message-id"] == 1


def test_too_far_ahead_without_rfc_6311_is_refused() -> None:
    w, sg2, ike, _ = _stale_takeover(dpd_by_gateway=False)
    ike.mid_sync = False
    sg2.start_mid_sync(ike, 12.0)
    ike.pending = None
    (ii,) = w.ini.ike_sas()
    ii.my_next_mid += RESYNC_AHEAD
    Wire(w.ini, sg2).deliver(w.ini.liveness(ii, 13.0), "i", 13.0)
    assert sg2.stats["bad-message-id"] == 1 and sg2.stats["message-id-resynced"] == 0


def test_rfc_6311_with_a_cbc_ike_sa_after_our_own_requests() -> None:
    w, sg2, ike, _ = _stale_takeover(before=2, ike=CBC)
    assert ike.my_next_mid == 2
    w2 = Wire(w.ini, sg2)
    w2.deliver(sg2.start_mid_sync(ike, 12.0), "r", 12.0)
    assert sg2.stats["mid-sync-done"] == 1 and ike.my_next_mid == 2 + MID_SYNC_LEAP
    w2.deliver(sg2.liveness(ike, 13.0), "r", 13.0)
    assert sg2.stats["liveness-ok"] == 1


def test_aead_ike_sa_after_our_own_requests_probes_instead() -> None:
    """strongSwan cannot answer a sync under AES-GCM once it answered one of our requests
    (its sequential IVs): keep the replicated IDs and probe ours. sg1 sent two liveness checks
    after its last replication: sg2's first request (the replica's ID) is dropped by the MN,
    the next try goes under the following ID (answered from the MN's cache, like any
    retransmission: RFC 7296 §2.1), and from then on the IDs agree."""
    w, sg2, ike, _ = _stale_takeover(dpd_by_gateway=2, before=1)  # type: ignore[arg-type]
    (ii,) = w.ini.ike_sas()
    assert (ike.my_next_mid, ii.peer_next_mid) == (1, 3)
    w2 = Wire(w.ini, sg2)
    w2.deliver(sg2.start_mid_sync(ike, 12.0), "r", 12.0)
    assert sg2.stats["mid-sync-aead-skipped"] == 1 and sg2.stats["mid-sync-sent"] == 0
    assert w.ini.stats["bad-message-id"] == 1 and ike.pending is not None
    w2.deliver(sg2.tick(14.0), "r", 14.0)  # retransmitted under the next ID
    assert sg2.stats["message-id-probed"] == 1 and ike.pending is None
    assert ike.my_next_mid == ii.peer_next_mid == 3
    w2.deliver(sg2.rekey_ike(ike, 15.0), "r", 15.0)
    assert sg2.stats["ike-sa-rekeyed"] == 1 and w.ini.stats["ike-sa-rekeyed"] == 1


def test_probing_survives_a_lost_first_check() -> None:
    """The replicated ID was right but the first liveness check was lost (the virtual address
    had not moved yet): the retransmission carries it under that ID and the next one; the peer
    answers both (it processes the first, then the second as the next request), and the taker
    ends with the peer's next expected ID."""
    w, sg2, ike, _ = _stale_takeover(dpd_by_gateway=False, before=1)
    (ii,) = w.ini.ike_sas()
    assert ike.my_next_mid == ii.peer_next_mid == 1
    first = sg2.start_mid_sync(ike, 12.0)  # AEAD, our requests before: no RFC 6311
    assert len(first) == 1 and sg2.stats["mid-sync-aead-skipped"] == 1  # ... and lost
    w2 = Wire(w.ini, sg2)
    w2.deliver(sg2.tick(14.0), "r", 14.0)
    assert sg2.stats["message-id-probed"] == 1 and ike.pending is None
    assert w.ini.stats["liveness-answered"] == 3  # sg1's check, and both probes
    assert ike.my_next_mid == ii.peer_next_mid == 3 and sg2.stats["message-id-probe-late"] == 1
    w2.deliver(sg2.liveness(ike, 20.0), "r", 20.0)
    assert ike.pending is None and sg2.stats["liveness-ok"] == 2


# -- IPSEC_REPLAY_COUNTER_SYNC as the peer --------------------------------------------------------


def _replay_sync(delta: int, *, announced: bool = True, leap: int = MID_SYNC_LEAP) -> tuple[
        Wire, IkeEngine, list[object]]:  # fmt: skip
    """sg2 took over from a stale replica and sends its sync with ``delta``; what the MN's
    engine (the IKE SA's peer) outputs."""
    w, sg2, ike, _ = _stale_takeover()
    (ii,) = w.ini.ike_sas()
    ii.replay_sync = announced
    assert ike.replay_sync
    out = sg2.start_mid_sync(ike, 12.0, leap=leap, esp_delta=delta)
    (req,) = [o for o in out if isinstance(o, Send)]
    return w, sg2, list(w.ini.receive(req.data, R500, I500, 12.0))


def test_replay_counter_sync_is_taken_within_policy() -> None:
    w, sg2, outs = _replay_sync(16384)
    (ii,) = w.ini.ike_sas()
    synced = [o for o in outs if isinstance(o, ReplayCounterSynced)]
    assert synced == [ReplayCounterSynced(ii, 16384)]
    assert w.ini.stats["replay-sync-applied"] == 1 and w.ini.stats["mid-sync-answered"] == 1
    Wire(w.ini, sg2).deliver([o for o in outs if isinstance(o, Send)], "i", 12.0)
    assert sg2.stats["mid-sync-done"] == 1


def test_replay_counter_sync_retransmitted_is_applied_once() -> None:
    """The sync's answer was lost: its retransmission (same nonce) is answered again, and the
    delta is not applied a second time."""
    w, sg2, ike, _ = _stale_takeover()
    out = sg2.start_mid_sync(ike, 12.0, esp_delta=16384)
    (req,) = [o for o in out if isinstance(o, Send)]
    first = w.ini.receive(req.data, R500, I500, 12.0)
    again = w.ini.receive(req.data, R500, I500, 14.0)
    assert len([o for o in first if isinstance(o, ReplayCounterSynced)]) == 1
    assert not [o for o in again if isinstance(o, ReplayCounterSynced)]
    assert [o for o in again if isinstance(o, Send)]
    assert w.ini.stats["replay-sync-applied"] == 1 and w.ini.stats["mid-sync-answered"] == 2


def test_sync_answer_goes_where_the_request_came_from() -> None:
    """RFC 7296 §2.11: the member that took over may be at another address."""
    from ipsecct.ikev2.ikesa import Address

    w, sg2, ike, _ = _stale_takeover(ike=CBC)
    there = Address(R500.host + 7, 4500)
    (req,) = [o for o in sg2.start_mid_sync(ike, 12.0) if isinstance(o, Send)]
    (ans,) = w.ini.receive(req.data, there, I500, 12.0)
    assert isinstance(ans, Send) and ans.dst == there


@pytest.mark.parametrize(
    ("delta", "announced", "counter"),
    [
        (MAX_REPLAY_DELTA + 1, True, "replay-sync-refused"),  # would burn our sequence space
        ((1 << 64) - 1, True, "replay-sync-refused"),
        (16384, False, "replay-sync-unannounced"),  # we never said we take it
    ],
)
def test_replay_counter_sync_refused_by_policy(delta: int, announced: bool, counter: str) -> None:
    """Refused (counted, logged, our counters untouched), the message-ID sync still answered."""
    w, _sg2, outs = _replay_sync(delta, announced=announced)
    assert not [o for o in outs if isinstance(o, ReplayCounterSynced)]
    assert w.ini.stats[counter] == 1 and w.ini.stats["mid-sync-answered"] == 1
    assert [o for o in outs if isinstance(o, Send)]


def test_replay_counter_sync_in_a_stale_sync_is_ignored() -> None:
    w, _sg2, outs = _replay_sync(16384, leap=0)
    assert outs == [] and w.ini.stats["mid-sync-stale"] == 1
    assert w.ini.stats["replay-sync-applied"] == 0


@given(seq=st.integers(0, (1 << 64) - 1), delta=st.integers(-(1 << 65), 1 << 65),
       esn=st.booleans())  # fmt: skip
def test_advance_seq_only_moves_forward_and_never_past_the_limit(
    seq: int, delta: int, esn: bool
) -> None:
    sa = make_sa(esn=esn)
    seq = min(seq, sa.seq_limit)
    sa.seq = seq
    new = sa.advance_seq(delta)
    assert new == sa.seq
    assert seq <= new <= sa.seq_limit
    assert new == min(seq + max(delta, 0), sa.seq_limit)


def test_advance_seq_queues_the_events_a_step_by_step_advance_would() -> None:
    sa = make_sa(esn=False)
    sa.seq = sa.seq_limit - (sa.seq_limit >> 3) - 5
    sa.advance_seq(1 << 20)  # past "near the limit": a rekey is asked for
    assert SAEvent.SEQ_NEAR_LIMIT in sa.events


# -- direct SG identity: the taker is at another address ------------------------------------------


@pytest.mark.parametrize("ike_alg", [CBC, GCM])
def test_taker_at_its_own_address_moves_the_peer_once_the_ids_agree(ike_alg: str) -> None:
    """The taker's sync (RFC 6311, CBC) or probe (AEAD after our own requests) goes from its
    own address; once the message IDs agree it sends the address update (MOBIKE: its address
    list) and the peer follows it there; nothing is lost on the way."""
    from ipsecct.ikev2.ikesa import Address

    if ike_alg == CBC:
        w, sg2, ike, _ = _stale_takeover(ike=ike_alg)
    else:  # after requests of sg1's own: no sync under AES-GCM, probing
        w, sg2, ike, _ = _stale_takeover(dpd_by_gateway=2, before=1)  # type: ignore[arg-type]
    (ii,) = w.ini.ike_sas()
    assert ii.mobike and ike.mobike
    here = Address(R500.host + 1, 500)
    w2 = Wire(w.ini, sg2)
    out = sg2.start_mid_sync(ike, 12.0, local=here)
    assert all(o.src == here for o in out if isinstance(o, Send))
    w2.deliver(out, "r", 12.0)
    if ike_alg == CBC:
        assert sg2.stats["mid-sync-done"] == 1
    else:  # the first probe is under a stale ID: its retransmission tries the next one too
        assert sg2.stats["address-update-sent"] == 0
        w2.deliver(sg2.tick(14.0), "r", 14.0)
        assert sg2.stats["message-id-probed"] == 1
    assert sg2.stats["address-update-sent"] == 1 and sg2.stats["address-update-ok"] == 1
    assert ii.remote == here and ike.local == here and ike.pending is None
    assert not ike.move_after_sync
    # and the IKE SA works from there: a liveness check each way, an IKE rekey
    w2.deliver(w.ini.liveness(ii, 16.0), "i", 16.0)
    w2.deliver(sg2.rekey_ike(ike, 17.0), "r", 17.0)
    assert sg2.stats["ike-sa-rekeyed"] == 1 and sg2.stats["liveness-answered"] >= 1


def test_taker_at_the_same_address_sends_no_address_update() -> None:
    w, sg2, ike, _ = _stale_takeover(ike=CBC)
    Wire(w.ini, sg2).deliver(sg2.start_mid_sync(ike, 12.0, local=ike.local), "r", 12.0)
    assert sg2.stats["mid-sync-done"] == 1 and sg2.stats["address-update-sent"] == 0


def test_a_request_that_crosses_the_sync_request_is_answered_after_the_sync() -> None:
    """The MN's liveness check (the ID the replica expects) reaches sg2 after sg2 sent its
    sync request and before the answer: sg2 leaves it unanswered. Answered then, the answer
    reached strongSwan 5.9.8 after it had taken the sync and re-queued its check, and it
    deleted the IKE SA ("received INFORMATIONAL response, but expected
    EXCHANGE_TYPE_UNDEFINED"). The MN sends it again under the ID the sync settles, and sg2
    answers that."""
    w = pair(mn_conn(dpd=10, ike=CBC), conn(dpd=10, ike=CBC))
    connect(w)
    (ii,), (ir,) = w.ini.ike_sas(), w.resp.ike_sas()
    sg2 = IkeEngine([conn(dpd=10, ike=CBC)])
    ike = sg2.import_ike(context.encode(ir, 5.0), 12.0)  # sg1 dies with nothing after it
    (check,) = w.ini.liveness(ii, 12.0)
    assert isinstance(check, Send)
    assert struct.unpack_from("!I", check.data, 20)[0] == ike.peer_next_mid  # expected
    sync = sg2.start_mid_sync(ike, 12.0)
    assert sg2.receive(check.data, check.src, check.dst, 12.0) == []
    assert sg2.stats["request-during-mid-sync"] == 1 and sg2.stats["liveness-answered"] == 0
    w2 = Wire(w.ini, sg2)
    w2.deliver(sync, "r", 12.1)
    assert sg2.stats["mid-sync-done"] == 1
    assert ii.pending is None and sg2.stats["liveness-answered"] == 1
    assert ike.peer_next_mid == ii.my_next_mid and ii.state.value == "established"
