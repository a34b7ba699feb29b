"""IKE SA fail-over in the etcd mode under an unmodified strongSwan client (root, indirect SG
identity): sg1 and sg2 are members of a cluster on a real etcd (in the host's namespace, on the
core network); strongSwan 5.9.8 (kernel-libipsec) in the MN's namespace connects by IKEv2 to
the virtual address held by sg1. sg1 replicates the tunnel and its IKE SA (one unit: the IKE SA
goes where its CHILD SAs' group goes) to sg2. sg1 is killed (SIGKILL) under a ping and a UDP
stream: once etcd has expired sg1's lease, sg2 creates the owner key of the group, installs
the tunnel (sequence numbers leapt) and takes the IKE SA over with it, claims the virtual
address and synchronises message IDs with strongSwan (RFC 6311). strongSwan keeps its IKE SA
(one IKE_SA_INIT, one IKE_AUTH in its log), answers sg2's liveness checks and completes an IKE
rekey with it, and no (SPI, sequence number) pair appears twice on the wire.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import strongswan
from tests.helpers.ike_world import CLIENT, Client, IkeWorld, ike_world, waiting_with_logs
from tests.helpers.netns_topology import HOST, MN_OUTER, SG_OUTER, VIP, Traffic, cli
from tests.helpers.strongswan import needs_strongswan


@pytest.fixture
def world(tmp_path: Path) -> Iterator[IkeWorld]:
    # CBC: strongSwan answers RFC 6311 with it
    with ike_world(tmp_path, "indirect", ike_proposal="aes128-sha256-x25519", etcd=True) as w:
        yield w


def esp_pairs(cap_fields: list[list[str]]) -> Counter[tuple[str, str]]:
    return Counter((spi, seq) for spi, seq in cap_fields if spi and seq)


def request_answered(w: IkeWorld, g: str, wait_until: Callable[..., None]) -> int:
    """A request of gateway ``g``'s own is answered by the client: a rekey of its one IKE
    SA's CHILD SA (``ipsecct sa rekey``, tried again while an exchange of ``g``'s is in
    flight). Its message IDs move, or are seen to agree with the client's after a take-over.
    (Its liveness checks did this until, as charon's, they stopped while the client's ESP
    comes in.) Returns 1: a CHILD SA strongSwan is told to delete."""
    n = w.counters(g).get("child-sa-rekeyed", 0)

    def asked() -> bool:
        (ike,) = w.ike_sas(g)
        r = cli("sa", "rekey", f"0x{ike['children'][0]['spi_in']}", "-s", w.sock(g))
        return r.returncode == 0

    wait_until(asked, f"{g} to send a CHILD SA rekey", 15)
    wait_until(lambda: w.counters(g).get("child-sa-rekeyed", 0) > n,
               f"the client to answer {g}'s CHILD SA rekey", 20)  # fmt: skip
    return 1


def no_delete_but_of_rekeyed(log: str, rekeyed: int) -> None:
    """strongSwan never had its IKE SA deleted, and a CHILD SA only after a gateway's rekey."""
    assert "received DELETE for IKE_SA" not in log, log[-4000:]
    assert len(re.findall(r"received DELETE for ESP CHILD_SA", log)) == rekeyed, log[-4000:]


@pytest.mark.root
@pytest.mark.slow
@needs_strongswan
@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGKILL, id="sigkill"),
        # stopped: it leaves its IKE SAs to the members holding replicas (no DELETE) and
        # revokes its lease, so that they take over at once
        pytest.param(signal.SIGTERM, id="sigterm"),
    ],
)
def test_strongswan_client_keeps_its_ike_sa_when_its_cluster_member_dies(
    world: IkeWorld, sig: signal.Signals
) -> None:
    w = world
    client = Client(w.ns, "mn", CLIENT, w.dir, "aes128gcm16")
    client.ike_proposal = w.ike_proposal
    with client as ss:

        wait_until = waiting_with_logs(w, ss, lambda: w.status("sg2").get("cluster"))

        # both members joined (IKE is fenced until a member holds its lease)
        for g in ("sg1", "sg2"):
            wait_until(lambda g=g: w.status(g)["cluster"]["lease"]["state"] == "held",
                       f"{g} to join the cluster", 30)  # fmt: skip
        ss.start()
        ss.initiate()
        assert strongswan.ping_once_up(w.ns, "mn", HOST, 3) == 3, ss.logtail() + w.logs()
        (ike1,) = w.ike_sas("sg1")
        assert not w.ike_sas("sg2")
        # sg1 owns the tunnel; sg2 holds replicas of the tunnel and of its IKE SA
        wait_until(lambda: w.status("sg1")["cluster"]["owned_tunnels"] == 1,
                   "sg1 to own the CHILD SA's tunnel", 15)  # fmt: skip
        wait_until(lambda: w.status("sg2")["cluster"]["replicated_ike_sas"].get("sg1") == 1,
                   "sg2 to hold a replica of the IKE SA", 15)  # fmt: skip
        # sg1's liveness checks move the message IDs; before the stream: as charon, a
        # gateway checks no client whose ESP comes in
        wait_until(lambda: w.counters("sg1").get("liveness-ok", 0) >= 2,
                   "sg1's liveness checks (message IDs move)", 15)  # fmt: skip
        cap = w.capture("mn", "esp-to-mn", f"udp dst port 4500 and dst host {MN_OUTER}")
        traffic = Traffic.start(w, udp_rate=200, after=200, limit=100_000, ping_interval=0.1)
        try:
            proc = w.daemons["sg1"].proc
            assert proc is not None
            proc.send_signal(sig)
            assert proc.wait(15) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
            w.route_host_via("sg2")
            wait_until(lambda: len(w.ike_sas("sg2")) == 1, "sg2 to take over the IKE SA", 30)
            cl = w.status("sg2")["cluster"]
            assert cl["taken_over"] == 1 and cl["ike_taken_over"] == 1, cl
            assert cl["ike_split"] == 0, cl
            wait_until(lambda: w.counters("sg2").get("mid-sync-done", 0) == 1,
                       "the RFC 6311 message-ID sync with strongSwan", 20)  # fmt: skip
            (ike2,) = w.ike_sas("sg2")
            assert (ike2["spi_i"], ike2["spi_r"]) == (ike1["spi_i"], ike1["spi_r"])
            assert [c["spi_in"] for c in ike2["children"]] == [
                c["spi_in"] for c in ike1["children"]]  # fmt: skip
            # a request of sg2's is answered: the message IDs agree
            rekeyed = request_answered(w, "sg2", wait_until)
            ss.swanctl("--rekey", "--ike", "cA")
            wait_until(lambda: w.counters("sg2").get("ike-sa-rekeyed", 0) >= 1, "IKE rekey", 20)
            assert strongswan.ping(w.ns, "mn", HOST, 5) == 5, ss.logtail() + w.logs()
            mn, host, ping = traffic.finish()
        finally:
            traffic.stop()
            cap.stop()
        log = ss.log()
        assert "responder requested MID sync" in log, ss.logtail()
        # the client never started over: one IKE_SA_INIT, one IKE_AUTH
        assert len(re.findall(r"generating IKE_SA_INIT request", log)) == 1, log
        assert len(re.findall(r"generating IKE_AUTH request", log)) == 1, log
        assert "ESTABLISHED => DESTROYING" not in log, ss.logtail()
        assert "ESTABLISHED => DELETING" not in log, ss.logtail()
        no_delete_but_of_rekeyed(log, rekeyed)
        assert "event=ike-sa-taken-over" in w.log("sg2"), w.log("sg2")
        if sig == signal.SIGTERM:
            assert "event=ike-sas-left-to-standby" in w.log("sg1"), w.log("sg1")
        # the wire: ESP to the MN from sg1, then from sg2, and no (SPI, sequence) twice
        pairs = esp_pairs(cap.fields("esp.spi", "esp.sequence"))
        assert sum(pairs.values()) > 200, pairs.most_common(3)
        repeated = [p for p, n in pairs.items() if n > 1]
        assert not repeated, repeated[:10]
        assert mn["duplicates"] == 0 and host["duplicates"] == 0, (mn, host)
        # one gap: etcd's lease (2 s) and the scan, then everything comes back
        assert mn["longest_missing_run"] < 6 * 200, mn
        assert mn["sent"] - mn["echoed"] <= mn["longest_missing_run"] + 5, mn
        print("stream:", mn, "\nping lost:", len(ping.lost), "\nsg2:", w.counters("sg2"),
              "\ncluster:", w.status("sg2")["cluster"],
              "\nesp pairs:", sum(pairs.values()))  # fmt: skip


@pytest.mark.root
@pytest.mark.slow
@needs_strongswan
def test_handover_then_the_target_dies_and_the_source_takes_the_ike_sa_back(
    world: IkeWorld,
) -> None:
    """A make-before-break handover and a fail-over of its target, one after the other: the
    strongSwan client's IKE SA and CHILD SA move from sg1 to sg2 (``ipsecct transfer``), sg2
    replicates them back to sg1 and runs liveness checks (message IDs move at sg2), then sg2
    is killed: sg1 adopts the group again, takes the IKE SA over from sg2's replica and
    synchronises message IDs with the client (RFC 6311). The client keeps its IKE SA, and no
    (SPI, sequence number) pair is sent twice: not by sg1 before the handover, sg2 after it,
    or sg1 again after the take-over."""
    w = world
    client = Client(w.ns, "mn", CLIENT, w.dir, "aes128gcm16")
    client.ike_proposal = w.ike_proposal
    with client as ss:

        wait_until = waiting_with_logs(w, ss, lambda: w.status("sg1").get("cluster"))

        for g in ("sg1", "sg2"):
            wait_until(lambda g=g: w.status(g)["cluster"]["lease"]["state"] == "held",
                       f"{g} to join the cluster")  # fmt: skip
        ss.start()
        ss.initiate()
        assert strongswan.ping_once_up(w.ns, "mn", HOST, 3) == 3, ss.logtail() + w.logs()
        (ike1,) = w.ike_sas("sg1")
        (child,) = ike1["children"]
        wait_until(lambda: w.status("sg2")["cluster"]["replicated_ike_sas"].get("sg1") == 1,
                   "sg2 to hold a replica of the IKE SA")  # fmt: skip
        cap = w.capture("mn", "esp-to-mn", f"udp dst port 4500 and dst host {MN_OUTER}")
        traffic = Traffic.start(w, udp_rate=200, after=200, limit=100_000, ping_interval=0.1)
        try:
            r = cli("transfer", f"0x{int(child['spi_out'], 16):08x}", "--to", "sg2", "--json",
                    "-s", w.sock("sg1"))  # fmt: skip
            assert r.returncode == 0, (r.stdout, r.stderr, w.logs())
            assert json.loads(r.stdout)["outcome"] == "committed", r.stdout
            w.route_host_via("sg2")
            wait_until(lambda: len(w.ike_sas("sg2")) == 1 and not w.ike_sas("sg1"),
                       "the IKE SA to move to sg2")  # fmt: skip
            # sg2 replicates it to sg1 and rekeys its CHILD SA: message IDs move
            wait_until(lambda: w.status("sg1")["cluster"]["replicated_ike_sas"].get("sg2") == 1,
                       "sg1 to hold a replica of the moved IKE SA")  # fmt: skip
            rekeyed = request_answered(w, "sg2", wait_until)
            proc = w.daemons["sg2"].proc
            assert proc is not None
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(15) == -signal.SIGKILL
            w.route_host_via("sg1")
            wait_until(lambda: len(w.ike_sas("sg1")) == 1, "sg1 to take the IKE SA back")
            wait_until(lambda: w.counters("sg1").get("mid-sync-done", 0) == 1,
                       "the RFC 6311 message-ID sync with strongSwan")  # fmt: skip
            (ike3,) = w.ike_sas("sg1")
            assert (ike3["spi_i"], ike3["spi_r"]) == (ike1["spi_i"], ike1["spi_r"])
            rekeyed += request_answered(w, "sg1", wait_until)  # (its IDs agree)
            ss.swanctl("--rekey", "--ike", "cA")
            wait_until(lambda: w.counters("sg1").get("ike-sa-rekeyed", 0) >= 1, "IKE rekey")
            assert strongswan.ping(w.ns, "mn", HOST, 5) == 5, ss.logtail() + w.logs()
            mn, host, ping = traffic.finish()
        finally:
            traffic.stop()
            cap.stop()
        log = ss.log()
        assert "responder requested MID sync" in log, ss.logtail()
        assert len(re.findall(r"generating IKE_SA_INIT request", log)) == 1, log
        assert len(re.findall(r"generating IKE_AUTH request", log)) == 1, log
        for bad in ("ESTABLISHED => DESTROYING", "ESTABLISHED => DELETING",
                    "INVALID_SYNTAX", "received message ID"):  # fmt: skip
            assert bad not in log, (bad, ss.logtail())
        no_delete_but_of_rekeyed(log, rekeyed)
        pairs = esp_pairs(cap.fields("esp.spi", "esp.sequence"))
        assert sum(pairs.values()) > 200, pairs.most_common(3)
        repeated = [p for p, n in pairs.items() if n > 1]
        assert not repeated, repeated[:10]
        assert mn["duplicates"] == 0 and host["duplicates"] == 0, (mn, host)
        # one gap: etcd's lease (2 s) and the scan after sg2 died
        assert mn["longest_missing_run"] < 6 * 200, mn
        print("stream:", mn, "\nping lost:", len(ping.lost), "\nsg1:", w.counters("sg1"),
              "\ncluster:", w.status("sg1")["cluster"],
              "\nesp pairs:", sum(pairs.values()))  # fmt: skip


@pytest.mark.root
@pytest.mark.slow
@needs_strongswan
def test_a_member_stopped_past_its_lease_wakes_and_sends_no_ike_message_the_taker_may_have_used(
    world: IkeWorld,
) -> None:
    """Guards the invariant (IKE message IDs, and ESP). sg1 is stopped (SIGSTOP) instead of
    killed: sg2 takes the IKE SA over once etcd ended sg1's lease, synchronises message IDs
    with strongSwan (RFC 6311) and uses new ones (its CHILD SA rekeys). sg1 runs again with
    its IKE SA, a liveness check long overdue (its timers fire late all at once; no ESP came
    since its last look: the stream starts once it is stopped)
    and perhaps requests of the client in its socket: it must send nothing (its fence is over
    on its clock) until etcd tells it its lease is gone, and then forget the IKE SA without a
    DELETE. Read off sg1's own link: not one IKE message nor ESP packet from it after the
    wake; strongSwan keeps its IKE SA (no DELETE, no message-ID complaint) and goes on
    answering sg2."""
    w = world
    client = Client(w.ns, "mn", CLIENT, w.dir, "aes128gcm16")
    client.ike_proposal = w.ike_proposal
    with client as ss:

        wait_until = waiting_with_logs(w, ss, lambda: w.status("sg2").get("cluster"))

        for g in ("sg1", "sg2"):
            wait_until(lambda g=g: w.status(g)["cluster"]["lease"]["state"] == "held",
                       f"{g} to join the cluster", 30)  # fmt: skip
        ss.start()
        ss.initiate()
        assert strongswan.ping_once_up(w.ns, "mn", HOST, 3) == 3, ss.logtail() + w.logs()
        (ike1,) = w.ike_sas("sg1")
        wait_until(lambda: w.status("sg2")["cluster"]["replicated_ike_sas"].get("sg1") == 1,
                   "sg2 to hold a replica of the IKE SA", 15)  # fmt: skip
        proc = w.daemons["sg1"].proc
        assert proc is not None
        # everything sg1 sends on its own link
        from_sg1 = w.capture("sg1", "from-sg1", f"udp and (src host {VIP} or src host "
                             f"{SG_OUTER['sg1']}) and (src port 500 or src port 4500)")  # fmt: skip
        # ESP through sg1 (the capture sees it), then sg1's liveness checks (message IDs
        # move): two, so that sg1 has looked at its CHILD SA's count since that ESP and
        # finds none newer when it wakes (a gateway checks no client whose ESP came in:
        # its check is overdue then, and must not be sent)
        assert strongswan.ping(w.ns, "mn", HOST, 3) == 3, ss.logtail() + w.logs()
        live = w.counters("sg1").get("liveness-ok", 0)
        wait_until(lambda: w.counters("sg1").get("liveness-ok", 0) >= max(live, 2) + 2,
                   "sg1's liveness checks (message IDs move)", 15)  # fmt: skip
        cap = w.capture("mn", "esp-to-mn", f"udp dst port 4500 and dst host {MN_OUTER}")
        traffic: Traffic | None = None
        try:
            t_stop = time.time()
            proc.send_signal(signal.SIGSTOP)
            traffic = Traffic.start(w, udp_rate=200, after=200, limit=100_000,
                                    ping_interval=0.1)  # fmt: skip
            w.route_host_via("sg2")
            wait_until(lambda: len(w.ike_sas("sg2")) == 1, "sg2 to take over the IKE SA", 30)
            wait_until(lambda: w.counters("sg2").get("mid-sync-done", 0) == 1,
                       "the RFC 6311 message-ID sync with strongSwan", 20)  # fmt: skip
            rekeyed = request_answered(w, "sg2", wait_until)  # (new message IDs)
            t_cont = time.time()
            proc.send_signal(signal.SIGCONT)
            wait_until(lambda: "event=cluster-lease-expired" in w.log("sg1"),
                       "sg1 to learn that its lease is gone", 20)  # fmt: skip
            assert not w.ike_sas("sg1")
            assert "event=ike-sas-forgotten" in w.log("sg1"), w.log("sg1")
            rekeyed += request_answered(w, "sg2", wait_until)  # (strongSwan goes on)
            assert strongswan.ping(w.ns, "mn", HOST, 5) == 5, ss.logtail() + w.logs()
            mn, host, _ = traffic.finish()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
            if traffic is not None:
                traffic.stop()
            cap.stop()
            from_sg1.stop()
        rows = from_sg1.fields("frame.time_epoch", "isakmp.messageid", "esp.spi")
        assert any(float(r[0]) < t_stop and r[2] for r in rows), rows[:5]  # it did send ESP
        woke = [r for r in rows if float(r[0]) >= t_cont]
        assert woke == [], f"sg1 sent after its wake: {woke[:10]}\n{w.log('sg1')}"
        (ike2,) = w.ike_sas("sg2")
        assert (ike2["spi_i"], ike2["spi_r"]) == (ike1["spi_i"], ike1["spi_r"])
        log = ss.log()
        assert len(re.findall(r"generating IKE_SA_INIT request", log)) == 1, log
        assert len(re.findall(r"generating IKE_AUTH request", log)) == 1, log
        for bad in ("ESTABLISHED => DESTROYING", "ESTABLISHED => DELETING",
                    "INVALID_SYNTAX", "received message ID"):  # fmt: skip
            assert bad not in log, (bad, ss.logtail())
        no_delete_but_of_rekeyed(log, rekeyed)
        pairs = esp_pairs(cap.fields("esp.spi", "esp.sequence"))
        repeated = [p for p, n in pairs.items() if n > 1]
        assert not repeated, repeated[:10]
        assert mn["duplicates"] == 0 and host["duplicates"] == 0, (mn, host)


@pytest.fixture
def direct_world(tmp_path: Path) -> Iterator[IkeWorld]:
    """The cluster world with direct SG identity: each gateway at its own address."""
    with ike_world(tmp_path, "direct", ike_proposal="aes128-sha256-x25519", etcd=True) as w:
        yield w


def _moved(ss: strongswan.Charon, src: str, dst: str) -> int:
    """How often the client logged moving its IKE SA from gateway ``src`` to ``dst``."""
    return len(re.findall(re.escape(f"remote endpoint changed from {SG_OUTER[src]}[4500] to "
                                    f"{SG_OUTER[dst]}[4500]"), ss.log()))  # fmt: skip


@pytest.mark.root
@pytest.mark.slow
@needs_strongswan
def test_direct_identity_handover_take_over_and_a_child_less_ike_sa(
    direct_world: IkeWorld,
) -> None:
    """Direct SG identity in the etcd mode (each gateway at its own address), and an IKE SA
    without a CHILD SA. A MOBIKE strongSwan client connects to sg1's address.

    1. ``ipsecct transfer`` hands it to sg2, which tells it its address (MOBIKE): strongSwan
       moves its IKE SA there and rekeys its CHILD SA with sg2 (kernel-libipsec).
    2. sg2 is killed: sg1 adopts the group, installs the tunnel and takes the IKE SA,
       synchronises message IDs (RFC 6311) and tells the client its address; the client moves
       back and rekeys its CHILD SA with sg1.
    3. The client deletes its only CHILD SA; sg2 is restarted (a new member) and holds a
       replica of the CHILD-less IKE SA (kept in a group of sg1's that the replica names).
    4. sg1 is killed: sg2 adopts that group though no tunnel is in it, takes the IKE SA over
       and tells the client its address; the client creates a CHILD SA with sg2 under the same
       IKE SA.

    Ping passes after each step; one IKE_SA_INIT and one IKE_AUTH in the client's log; no
    (SPI, sequence number) pair twice on the wire."""
    w = direct_world
    client = Client(w.ns, "mn", CLIENT, w.dir, "aes128gcm16")
    client.ike_proposal = w.ike_proposal
    client.gateway = SG_OUTER["sg1"]
    client.mobike = "yes"
    with client as ss:

        def clusters() -> object:
            return {g: w.status(g).get("cluster") for g, d in w.daemons.items()
                    if d.proc is not None and d.proc.poll() is None}  # fmt: skip

        wait_until = waiting_with_logs(w, ss, clusters)

        def joined(g: str) -> None:
            wait_until(lambda: w.status(g)["cluster"]["lease"]["state"] == "held",
                       f"{g} to join the cluster")  # fmt: skip

        def kill(g: str) -> None:
            proc = w.daemons[g].proc
            assert proc is not None
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(15) == -signal.SIGKILL

        def owners() -> dict[str, str | None]:
            """etcd's tunnel keys and their owners (``ipsecct cluster status``, from the core
            network, where etcd is)."""
            r = w.ns.run("host", sys.executable, "-m", "ipsecct", "cluster", "status", "--json",
                         "--config", str(w.dir / "sg1.toml"), check=False)  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr
            out: dict[str, str | None] = json.loads(r.stdout)["owners"]
            return out

        def child_out(g: str) -> str:
            ((c,),) = [i["children"] for i in w.ike_sas(g)]
            return f"0x{int(c['spi_out'], 16):08x}"

        def pings(n: int) -> int:  # 0.01 s apart, every reply waited for
            return strongswan.ping(w.ns, "mn", HOST, n, gap=0.01)

        for g in ("sg1", "sg2"):
            joined(g)
        ss.start()
        ss.initiate()
        assert strongswan.ping_once_up(w.ns, "mn", HOST, 3) == 3, ss.logtail() + w.logs()
        (ike1,) = w.ike_sas("sg1")
        assert ike1["mobike"] and ike1["local"] == f"{SG_OUTER['sg1']}:4500"
        (child,) = ike1["children"]
        spis = (ike1["spi_i"], ike1["spi_r"])
        cap = w.capture("mn", "esp-to-mn", f"udp dst port 4500 and dst host {MN_OUTER}")
        try:
            # 1. the handover, direct: sg2 tells the client its address under the moved IKE SA
            stream = strongswan.Pinger(w.ns, "mn", HOST, gap=0.02, count=150)
            r = cli("transfer", f"0x{int(child['spi_out'], 16):08x}", "--to", "sg2", "--json",
                    "-s", w.sock("sg1"))  # fmt: skip
            assert r.returncode == 0, (r.stdout, r.stderr, w.logs())
            assert json.loads(r.stdout)["outcome"] == "committed", r.stdout
            w.route_host_via("sg2")
            wait_until(lambda: _moved(ss, "sg1", "sg2") == 1, "the client to move to sg2")
            wait_until(lambda: w.counters("sg2").get("child-sa-rekeyed", 0) >= 1,
                       "strongSwan's CHILD rekey with sg2")  # fmt: skip
            wait_until(lambda: pings(1) == 1, "ping through sg2")
            print("ping through the handover:", stream.stop())
            (ike2,) = w.ike_sas("sg2")
            assert (ike2["spi_i"], ike2["spi_r"]) == spis and not w.ike_sas("sg1")
            assert ike2["local"] == f"{SG_OUTER['sg2']}:4500"
            # etcd has the rekeyed CHILD SA's key only: the moved one's, which strongSwan
            # deleted at sg2 before sg1 handed its key over, was deleted once it landed
            wait_until(lambda: owners() == {child_out("sg2"): "sg2"},
                       "etcd to hold the key of sg2's CHILD SA alone")  # fmt: skip
            # 2. sg2 dies with the tunnel: sg1 takes both, and tells the client its address
            wait_until(lambda: w.status("sg1")["cluster"]["replicated_ike_sas"].get("sg2") == 1,
                       "sg1 to hold a replica of the moved IKE SA")  # fmt: skip
            wait_until(lambda: w.counters("sg2").get("liveness-ok", 0) >= 2,
                       "sg2's liveness checks (message IDs move)")  # fmt: skip
            rekeyed = w.counters("sg1").get("child-sa-rekeyed", 0)
            kill("sg2")
            w.route_host_via("sg1")
            wait_until(lambda: len(w.ike_sas("sg1")) == 1, "sg1 to take over the IKE SA")
            cl = w.status("sg1")["cluster"]
            assert cl["taken_over"] == 1 and cl["ike_taken_over"] == 1, cl
            wait_until(lambda: w.counters("sg1").get("mid-sync-done", 0) == 1,
                       "the RFC 6311 message-ID sync with strongSwan (sg1)")  # fmt: skip
            wait_until(lambda: _moved(ss, "sg2", "sg1") == 1, "the client to move to sg1")
            wait_until(lambda: w.counters("sg1").get("child-sa-rekeyed", 0) > rekeyed,
                       "strongSwan's CHILD rekey with sg1")  # fmt: skip
            wait_until(lambda: pings(1) == 1, "ping through sg1")
            assert pings(100) == 100, ss.logtail() + w.logs()
            (ike3,) = w.ike_sas("sg1")
            assert (ike3["spi_i"], ike3["spi_r"]) == spis
            assert ike3["local"] == f"{SG_OUTER['sg1']}:4500"
            # 3. the client deletes its only CHILD SA: the IKE SA stays, without one; sg2
            # comes back and holds a replica of it
            ss.swanctl("--terminate", "--child", "net")
            wait_until(lambda: [i["children"] for i in w.ike_sas("sg1")] == [[]],
                       "sg1's IKE SA without a CHILD SA")  # fmt: skip
            w.daemons["sg2"].start()
            joined("sg2")
            wait_until(lambda: w.status("sg2")["cluster"]["replicated_ike_sas_without_child"]
                       .get("sg1") == 1, "sg2 to hold a replica of the CHILD-less IKE SA")
            live = w.counters("sg1").get("liveness-ok", 0)
            wait_until(lambda: w.counters("sg1").get("liveness-ok", 0) >= live + 1,
                       "sg1's liveness check (message IDs move)")  # fmt: skip
            # 4. sg1 dies: sg2 adopts the group the replica names, takes the IKE SA
            kill("sg1")
            w.route_host_via("sg2")
            wait_until(lambda: len(w.ike_sas("sg2")) == 1, "sg2 to take over the IKE SA")
            (ike4,) = w.ike_sas("sg2")
            assert (ike4["spi_i"], ike4["spi_r"]) == spis and ike4["children"] == []
            cl = w.status("sg2")["cluster"]
            assert cl["taken_over"] == 0 and cl["ike_taken_over"] == 1, cl
            assert cl["takeovers"][-1]["ike_sas"] == 1, cl
            wait_until(lambda: w.counters("sg2").get("mid-sync-done", 0) == 1,
                       "the RFC 6311 message-ID sync with strongSwan (sg2)")  # fmt: skip
            wait_until(lambda: _moved(ss, "sg1", "sg2") == 2, "the client to move to sg2 again")
            ss.swanctl("--initiate", "--child", "net")  # under the same IKE SA, with sg2
            wait_until(lambda: pings(1) == 1, "ping through sg2 again")
            assert pings(100) == 100, ss.logtail() + w.logs()
            (ike5,) = w.ike_sas("sg2")
            assert (ike5["spi_i"], ike5["spi_r"]) == spis and len(ike5["children"]) == 1
            wait_until(lambda: owners() == {child_out("sg2"): "sg2"},
                       "etcd to hold the key of the new CHILD SA alone")  # fmt: skip
        finally:
            cap.stop()
        sas = ss.list_sas()
        assert f"@ {SG_OUTER['sg2']}[4500]" in sas and f"{SG_OUTER['sg1']}[" not in sas, sas
        log = ss.log()
        assert len(re.findall(r"responder requested MID sync", log)) == 2, ss.logtail()
        assert len(re.findall(r"generating IKE_SA_INIT request", log)) == 1, log
        assert len(re.findall(r"generating IKE_AUTH request", log)) == 1, log
        for bad in ("ESTABLISHED => DESTROYING", "ESTABLISHED => DELETING"):
            assert bad not in log, (bad, ss.logtail())
        pairs = esp_pairs(cap.fields("esp.spi", "esp.sequence"))
        assert sum(pairs.values()) > 300, pairs.most_common(3)
        repeated = [p for p, n in pairs.items() if n > 1]
        assert not repeated, repeated[:10]
        print("sg2:", w.counters("sg2"), "\ncluster:", w.status("sg2")["cluster"])
