"""Moving an IKE SA while the unmodified strongSwan client is in the middle of something (root,
indirect SG identity): strongSwan 5.9.8 (kernel-libipsec) in the MN's namespace, two ipsecct
gateways. The client's own rekey reaches the source gateway while the transfer of its IKE SA
runs: the source neither answers nor processes it (that would make a CHILD SA or an IKE SA
the transfer does not carry), and hands it with the IKE SA to the target, which answers it.

To land the request inside the transfer's window deterministically the test stops the target
gateway (SIGSTOP) once the transfer has started, so that the source waits for its answer; the
client's rekey is sent then, and the target goes on (SIGCONT) once the source holds the
request. A ping and a UDP stream run all the time; a capture at the MN checks that no (SPI,
sequence number) pair is sent twice.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import strongswan
from tests.helpers.ike_world import CLIENT, Client, IkeWorld, ike_world, waiting_with_logs
from tests.helpers.netns_topology import HOST, MN_OUTER, VIP, Traffic
from tests.helpers.strongswan import needs_strongswan


def _long_transfers(w: IkeWorld) -> None:
    # the target is stopped for a moment inside each transfer: a generous time limit, so
    # that a loaded machine does not turn the test into a rolled-back transfer
    for g in ("sg1", "sg2"):
        p = w.dir / f"{g}.toml"
        p.write_text(p.read_text().replace("max_transfer_ms = 4000", "max_transfer_ms = 30000"))


def _start_transfer(w: IkeWorld, src: str, dst: str) -> subprocess.Popen[str]:
    (ike,) = w.ike_sas(src)
    (child,) = ike["children"]
    return subprocess.Popen(
        [sys.executable, "-m", "ipsecct", "transfer", f"0x{int(child['spi_out'], 16):08x}",
         "--to", dst, "--json", "-s", w.sock(src)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.root
@pytest.mark.slow
@needs_strongswan
def test_client_rekeys_reaching_the_source_during_a_transfer_are_answered_by_the_target(
    tmp_path: Path,
) -> None:
    """sg1 -> sg2 while strongSwan rekeys its CHILD SA, then sg2 -> sg1 while it rekeys its
    IKE SA: each request reaches the source inside the transfer, is held there and answered
    by the target; the client keeps its IKE SA (one IKE_SA_INIT, one IKE_AUTH), its rekeys
    complete with the gateway it ends up with, and the stream goes on."""
    with ike_world(tmp_path, "indirect", edit=_long_transfers) as w:
        client = Client(w.ns, "mn", CLIENT, w.dir, "aes128gcm16")
        with client as ss:

            wait_until = waiting_with_logs(w, ss)

            def move(src: str, dst: str, rekey: tuple[str, str], done: str) -> None:
                """Transfer the client's IKE SA from src to dst with the client's rekey
                landing at src inside the transfer; wait until dst has done it."""
                target = w.daemons[dst].proc
                assert target is not None
                before = w.counters(src).get("request-held", 0)
                os.kill(target.pid, signal.SIGSTOP)
                try:
                    cli = _start_transfer(w, src, dst)
                    wait_until(lambda: w.status(src)["transfers"]["in_progress"] == 1,
                               f"the transfer {src} -> {dst} to start")  # fmt: skip
                    t0 = time.monotonic()
                    ss.swanctl("--rekey", *rekey)
                    wait_until(lambda: w.counters(src).get("request-held", 0) > before,
                               f"{src} to hold the client's request")  # fmt: skip
                finally:
                    os.kill(target.pid, signal.SIGCONT)
                held_for.append(time.monotonic() - t0)
                out, err = cli.communicate(timeout=60)
                assert cli.returncode == 0, (out, err, w.logs())
                assert json.loads(out)["outcome"] == "committed", out
                w.route_host_via(dst)
                wait_until(lambda: w.counters(dst).get(done, 0) >= 1, f"{dst}: {done}")
                wait_until(lambda: len(w.ike_sas(dst)) == 1 and not w.ike_sas(src),
                           f"the IKE SA to be at {dst} only")  # fmt: skip
                assert w.counters(src).get("held-forwarded", 0) >= 1, w.counters(src)
                assert w.counters(dst).get("forward-received", 0) >= 1, w.counters(dst)
                # the old CHILD SA goes (the client deletes it, its inbound shadow expires)
                wait_until(lambda: one_child(dst), f"one CHILD SA at {dst}")

            def one_child(g: str) -> bool:
                (ike,) = w.ike_sas(g)
                if len(ike["children"]) != 1:
                    return False
                c = ike["children"][0]
                spis = {int(sa["spi"], 16) for sa in w.sa_list(g)}
                return spis == {int(c["spi_in"], 16), int(c["spi_out"], 16)}

            held_for: list[float] = []  # how long each request waited at the source (s)
            ss.start()
            ss.initiate()
            assert strongswan.ping_once_up(w.ns, "mn", HOST, 3) == 3, ss.logtail() + w.logs()
            (ike1,) = w.ike_sas("sg1")
            cap = w.capture("mn", "esp-to-mn", f"udp dst port 4500 and dst host {MN_OUTER}")
            traffic = Traffic.start(w, udp_rate=100, after=100, limit=100_000,
                                    ping_interval=0.1)  # fmt: skip
            try:
                move("sg1", "sg2", ("--child", "net"), "child-sa-rekeyed")
                (ike2,) = w.ike_sas("sg2")
                assert (ike2["spi_i"], ike2["spi_r"]) == (ike1["spi_i"], ike1["spi_r"])
                assert strongswan.ping(w.ns, "mn", HOST, 3) == 3, ss.logtail() + w.logs()
                move("sg2", "sg1", ("--ike", "cA"), "ike-sa-rekeyed")
                (ike3,) = w.ike_sas("sg1")
                assert ike3["spi_i"] != ike1["spi_i"]  # the client's new IKE SA
                assert strongswan.ping(w.ns, "mn", HOST, 5) == 5, ss.logtail() + w.logs()
                mn, host, ping = traffic.finish()
            finally:
                traffic.stop()
                cap.stop()
            # the message IDs agree: strongSwan's liveness check (sent once nothing came in
            # for dpd_delay, 2 s: now that the stream stopped) is answered
            n = w.counters("sg1").get("liveness-answered", 0)
            wait_until(lambda: w.counters("sg1").get("liveness-answered", 0) > n,
                       "sg1 to answer strongSwan's liveness check")  # fmt: skip
            log = ss.log()
            assert len(re.findall(r"generating IKE_SA_INIT request", log)) == 1, log
            assert len(re.findall(r"generating IKE_AUTH request", log)) == 1, log
            # message IDs agree (none ignored as unexpected), nothing refused or given up
            for bad in ("INVALID_SYNTAX", "giving up", "ESTABLISHED => DESTROYING",
                        "received message ID", "processing failed"):  # fmt: skip
                assert bad not in log, (bad, ss.logtail())
            pairs = Counter((s, q) for s, q in cap.fields("esp.spi", "esp.sequence") if s and q)
            assert sum(pairs.values()) > 100, pairs.most_common(3)
            repeated = [p for p, k in pairs.items() if k > 1]
            assert not repeated, repeated[:10]
            assert mn["duplicates"] == 0 and host["duplicates"] == 0, (mn, host)
            print("stream:", mn, "\nping lost:", len(ping.lost), "\nheld for:", held_for,
                  "\nretransmits:", log.count("retransmit"),
                  "\nsg1:", w.counters("sg1"), "\nsg2:", w.counters("sg2"))  # fmt: skip
            # each request answered by the target as soon as it had the IKE SA: strongSwan
            # retransmits after 4 s, and it needs to only if the test held it that long
            if max(held_for) < 3.5:
                assert "retransmit" not in log, (held_for, ss.logtail())
            # nothing lost but what crossed the moment the host's route moved (ESP sg1
            # forwards meanwhile; the ping's reply on its way)
            assert mn["sent"] - mn["echoed"] <= 5, mn


# CREATE_CHILD_SA requests from the virtual address (the gateway's own rekeys) dropped at
# the client: UDP 4500, the non-ESP marker, exchange type 36, the R(esponse) flag clear
NO_CHILD_REKEYS_FROM_GW = f"""table inet ict_norekey {{
  chain input {{
    type filter hook input priority 0; policy accept;
    ip saddr {VIP} udp sport 4500 @th,64,32 0 @th,240,8 36 @th,248,8 & 0x20 == 0 drop
  }}
}}
"""


def _child_rekeys(w: IkeWorld) -> None:
    _long_transfers(w)
    for g in ("sg1", "sg2"):  # the gateways rekey their CHILD SAs every 7.2-8 s
        p = w.dir / f"{g}.toml"
        p.write_text(p.read_text().replace("[connections.rw]\n",
                                           "[connections.rw]\nchildren.net.rekey_time = 8\n"))


@pytest.mark.root
@pytest.mark.slow
@needs_strongswan
def test_a_transfer_waits_for_the_gateways_own_rekey_in_flight(tmp_path: Path) -> None:
    """sg1's own CHILD rekey is in flight (its request does not reach the client at first)
    when a transfer of the IKE SA to sg2 is asked for: the transfer waits until the rekey
    and the DELETE of the old CHILD SA are done, then moves the IKE SA with its new CHILD SA;
    strongSwan sees consecutive message IDs from sg1 then sg2, keeps its IKE SA, and sg2
    rekeys the CHILD SA on schedule after the handover."""
    with (
        ike_world(tmp_path, "indirect", edit=_child_rekeys) as w,
        Client(w.ns, "mn", CLIENT, w.dir, "aes128gcm16") as ss,
    ):

        wait_until = waiting_with_logs(w, ss)

        ss.start()
        subprocess.run(w.ns.cmd("mn", "nft", "-f", "-"), input=NO_CHILD_REKEYS_FROM_GW,
                       text=True, check=True, timeout=30)  # fmt: skip
        try:
            ss.initiate()
            assert strongswan.ping_once_up(w.ns, "mn", HOST, 3) == 3, ss.logtail() + w.logs()
            (ike1,) = w.ike_sas("sg1")
            (child1,) = ike1["children"]
            traffic = Traffic.start(w, udp_rate=100, after=100, limit=100_000,
                                    ping_interval=0.1)  # fmt: skip
            try:
                # sg1's rekey falls due: its request is dropped at the client
                wait_until(lambda: w.counters("sg1").get("rekey-child-sent", 0) >= 1,
                           "sg1 to send its CHILD rekey")  # fmt: skip
                cli = _start_transfer(w, "sg1", "sg2")
                wait_until(lambda: w.counters("sg1").get("transfer-waited", 0) >= 1,
                           "the transfer to wait for sg1's rekey")  # fmt: skip
                assert cli.poll() is None and not w.ike_sas("sg2")
            finally:
                w.ns.run("mn", "nft", "delete", "table", "inet", "ict_norekey", check=False)
            # sg1's retransmission gets through: the rekey, the DELETE, then the transfer
            out, err = cli.communicate(timeout=60)
            assert cli.returncode == 0, (out, err, w.logs())
            assert json.loads(out)["outcome"] == "committed", out
            w.route_host_via("sg2")
            wait_until(lambda: len(w.ike_sas("sg2")) == 1 and not w.ike_sas("sg1"),
                       "the IKE SA to be at sg2 only")  # fmt: skip
            (ike2,) = w.ike_sas("sg2")
            assert (ike2["spi_i"], ike2["spi_r"]) == (ike1["spi_i"], ike1["spi_r"])
            (child2,) = ike2["children"]
            assert child2["spi_in"] != child1["spi_in"]  # the rekeyed one moved
            assert w.counters("sg1").get("child-sa-rekeyed", 0) == 1, w.counters("sg1")
            # sg2 rekeys the CHILD SA on schedule: its own request under the next ID
            wait_until(lambda: w.counters("sg2").get("child-sa-rekeyed", 0) >= 1,
                       "sg2's own CHILD rekey")  # fmt: skip
            assert strongswan.ping(w.ns, "mn", HOST, 5) == 5, ss.logtail() + w.logs()
            mn, host, ping = traffic.finish()
        finally:
            w.ns.run("mn", "nft", "delete", "table", "inet", "ict_norekey", check=False)
        log = ss.log()
        assert len(re.findall(r"generating IKE_SA_INIT request", log)) == 1, log
        assert len(re.findall(r"generating IKE_AUTH request", log)) == 1, log
        for bad in ("INVALID_SYNTAX", "giving up", "ESTABLISHED => DESTROYING",
                    "received message ID", "processing failed"):  # fmt: skip
            assert bad not in log, (bad, ss.logtail())
        assert "ike-sa-stays" not in w.log("sg1"), w.log("sg1")
        assert mn["duplicates"] == 0 and host["duplicates"] == 0, (mn, host)
        print("stream:", mn, "\nping lost:", len(ping.lost),
              "\nsg1:", w.counters("sg1"), "\nsg2:", w.counters("sg2"))  # fmt: skip
        assert mn["sent"] - mn["echoed"] <= 5, mn


@pytest.mark.root
@pytest.mark.slow
@needs_strongswan
def test_a_client_back_with_initial_contact_while_prepared_is_not_committed_away(
    tmp_path: Path,
) -> None:
    """The client reboots (SIGKILL: no DELETE) while its CHILD SA's transfer is prepared,
    and connects to sg1 again with INITIAL_CONTACT: sg1 replaces the quiet IKE SA (its
    CHILD SA's tunnel goes). The commit then rolls the transfer back, saying why; before,
    it committed the tunnel nobody at sg1 held any more, which sg2 activated: an orphan
    CHILD SA there, no IKE SA to end it. The client's new SAs carry traffic at sg1."""
    with ike_world(tmp_path, "indirect") as w, \
            Client(w.ns, "mn", CLIENT, w.dir, "aes128gcm16") as ss:  # fmt: skip
        wait_until = waiting_with_logs(w, ss)
        ss.start()
        ss.initiate()
        assert strongswan.ping_once_up(w.ns, "mn", HOST, 3) == 3, ss.logtail() + w.logs()
        (ike,) = w.ike_sas("sg1")
        (child,) = ike["children"]
        r = subprocess.run(
            [sys.executable, "-m", "ipsecct", "transfer", f"0x{int(child['spi_out'], 16):08x}",
             "--to", "sg2", "--prepare", "--json", "-s", w.sock("sg1")],
            capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, (r.stdout, r.stderr, w.logs())
        tid = str(json.loads(r.stdout)["id"])
        ss.kill()  # the client reboots
        ss.start()
        ss.initiate()
        wait_until(lambda: w.counters("sg1").get("initial-contact-replaced", 0) == 1,
                   "sg1 to replace the old IKE SA")  # fmt: skip
        r = subprocess.run(
            [sys.executable, "-m", "ipsecct", "transfer", "--commit", tid, "--json",
             "-s", w.sock("sg1")], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 1, (r.stdout, r.stderr, w.logs())
        rec = json.loads(r.stdout)
        assert rec["outcome"] == "failed" and "removed here" in rec["detail"], rec
        wait_until(lambda: not w.status("sg2")["transfers"]["in_progress"],
                   "sg2 to discard the transfer")  # fmt: skip
        assert w.status("sg2")["sas"] == 0 and not w.ike_sas("sg2")
        (new,) = w.ike_sas("sg1")
        assert new["spi_i"] != ike["spi_i"] and len(new["children"]) == 1
        assert strongswan.ping(w.ns, "mn", HOST, 3) == 3, ss.logtail() + w.logs()

@pytest.mark.root
@pytest.mark.slow
@needs_strongswan
def test_a_client_rekey_during_a_prepared_transfer_rolls_it_back_and_is_answered_at_once(
    tmp_path: Path,
) -> None:
    """A prepared transfer (``transfer --prepare``) keeps the IKE SA quiet until its commit,
    up to prepare_timeout (30 s): longer than strongSwan waits before it retransmits (4 s).
    So the client's CHILD rekey held at sg1 rolls the preparation back at once and sg1
    answers it: no retransmission, the rekey completes at sg1, the commit then says the
    transfer was rolled back (one line, exit status 2). Prepared again and committed, the
    IKE SA follows its CHILD SA to sg2 as after any transfer."""
    with ike_world(tmp_path, "indirect") as w, \
            Client(w.ns, "mn", CLIENT, w.dir, "aes128gcm16") as ss:  # fmt: skip
        wait_until = waiting_with_logs(w, ss)
        ss.start()
        ss.initiate()
        assert strongswan.ping_once_up(w.ns, "mn", HOST, 3) == 3, ss.logtail() + w.logs()

        def prepare() -> str:
            (ike,) = w.ike_sas("sg1")
            (child,) = ike["children"]
            r = subprocess.run(
                [sys.executable, "-m", "ipsecct", "transfer",
                 f"0x{int(child['spi_out'], 16):08x}", "--to", "sg2", "--prepare",
                 "--json", "-s", w.sock("sg1")],
                capture_output=True, text=True, timeout=60)  # fmt: skip
            assert r.returncode == 0, (r.stdout, r.stderr, w.logs())
            rec = json.loads(r.stdout)
            assert rec["outcome"] == "prepared", rec
            return str(rec["id"])

        def transfer(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "ipsecct", "transfer", *args, "--json",
                 "-s", w.sock("sg1")], capture_output=True, text=True, timeout=60)  # fmt: skip

        tid = prepare()
        held = w.counters("sg1").get("request-held", 0)
        t0 = time.monotonic()
        ss.swanctl("--rekey", "--child", "net")
        wait_until(lambda: w.counters("sg1").get("child-sa-rekeyed", 0) >= 1,
                   "sg1 to complete the client's rekey")  # fmt: skip
        took = time.monotonic() - t0
        c = w.counters("sg1")
        assert c.get("request-held", 0) == held + 1 and c.get("held-processed", 0) >= 1, c
        r = transfer("--commit", tid)
        assert r.returncode == 2 and "rolled back" in r.stderr, (r.stdout, r.stderr)
        recent = w.status("sg1")["transfers"]["recent"]
        (mine,) = [t for t in recent if t["id"] == tid]
        assert mine["outcome"] == "cancelled" and "IKE request" in mine["detail"], mine
        assert strongswan.ping(w.ns, "mn", HOST, 3) == 3, ss.logtail() + w.logs()
        # prepared again (the CHILD SA the rekey made) and committed: it moves
        tid = prepare()
        r = transfer("--commit", tid)
        assert r.returncode == 0 and json.loads(r.stdout)["outcome"] == "committed", (
            r.stdout, r.stderr, w.logs())
        w.route_host_via("sg2")
        wait_until(lambda: len(w.ike_sas("sg2")) == 1 and not w.ike_sas("sg1"),
                   "the IKE SA to be at sg2 only")  # fmt: skip
        assert strongswan.ping(w.ns, "mn", HOST, 3) == 3, ss.logtail() + w.logs()
        log = ss.log()
        if took < 3.5:
            assert "retransmit" not in log, (took, ss.logtail())
        for bad in ("INVALID_SYNTAX", "giving up", "received message ID"):
            assert bad not in log, (bad, ss.logtail())


@pytest.mark.root
@pytest.mark.slow
@needs_strongswan
def test_the_operator_cannot_delete_an_ike_sa_in_a_prepared_transfer(tmp_path: Path) -> None:
    """``ipsecct sa delete --ike`` of an IKE SA whose CHILD SA is in a prepared transfer (in
    the transfer's UNIT) is refused, one line naming the transfer, and nothing is deleted:
    a DELETE under it would have the target activate, at the COMMIT, CHILD SAs the client
    had been told are gone. Once the transfer is cancelled, the same command deletes the
    IKE SA and the client is told."""
    with ike_world(tmp_path, "indirect") as w, \
            Client(w.ns, "mn", CLIENT, w.dir, "aes128gcm16") as ss:  # fmt: skip
        wait_until = waiting_with_logs(w, ss)
        ss.start()
        ss.initiate()
        assert strongswan.ping_once_up(w.ns, "mn", HOST, 3) == 3, ss.logtail() + w.logs()
        (ike,) = w.ike_sas("sg1")
        (child,) = ike["children"]

        def ipsecct(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "ipsecct", *args, "-s", w.sock("sg1")],
                                  capture_output=True, text=True, timeout=60)  # fmt: skip

        r = ipsecct("transfer", f"0x{int(child['spi_out'], 16):08x}", "--to", "sg2",
                    "--prepare", "--json")  # fmt: skip
        assert r.returncode == 0, (r.stdout, r.stderr, w.logs())
        tid = str(json.loads(r.stdout)["id"])
        for how in (["--ike", "rw"], ["--ike", f"{ike['spi_r']}_r"],
                    ["--ike-id", str(ike["uid"])]):  # fmt: skip
            r = ipsecct("sa", "delete", *how)
            assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, (how, r.stderr)
            assert "is being transferred" in r.stderr and tid in r.stderr, (how, r.stderr)
        assert len(w.ike_sas("sg1")) == 1 and w.status("sg1")["sas"] == 2
        assert "received DELETE" not in ss.log()
        r = ipsecct("transfer", "--cancel", tid, "--json")
        assert json.loads(r.stdout)["outcome"] == "cancelled", (r.stdout, r.stderr)
        assert strongswan.ping(w.ns, "mn", HOST, 2) == 2, ss.logtail() + w.logs()
        r = ipsecct("sa", "delete", "--ike", "rw")
        assert r.returncode == 0 and "answered" in r.stdout, (r.stdout, r.stderr)
        strongswan.wait_log(ss, r"received DELETE for IKE_SA cA")
        wait_until(lambda: "cA: #" not in ss.list_sas(), "the client to drop the SAs")
        assert not w.ike_sas("sg1") and w.status("sg1")["sas"] == 0
        assert not w.ike_sas("sg2") and w.status("sg2")["sas"] == 0
