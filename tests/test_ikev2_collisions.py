"""IKEv2 rekey collisions with a real peer over real sockets (RFC 7296 §2.8.1, §2.8.2,
§2.25): an unmodified strongSwan 5.9.8 initiator (namespace "a") and an ``ipsecct
gateway`` (namespace "b"), as in ``test_ikev2_strongswan.py``.

Each collision is forced, not waited for: the gateway's IKE datagrams to strongSwan (UDP
from port 500 or 4500 that is not ESP, held by an nftables rule in "a") are dropped while
the operator starts the same exchange at both ends (``ipsecct sa rekey`` and ``swanctl
--rekey``), the gateway's first. strongSwan's request reaches the gateway, which answers it
with its own request in flight (the answer is held too); once the hold ends, the gateway's
retransmitted request reaches strongSwan, whose own is still unanswered. Each side has
then seen the other's request cross its own, as two requests crossing on the wire.
ESP is never held."""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.control import ask
from tests.helpers.daemon import Daemon
from tests.helpers.ike_interop import (
    Initiator,
    cli,
    gateway_config,
    node_config,
    start,
    workdir,
)
from tests.helpers.netns import Namespaces, wait_until
from tests.helpers.strongswan import (
    SWANCTL,
    A,
    B,
    Charon,
    Pinger,
    build_namespaces,
    needs_strongswan,
    ping,
)

__all__ = ["workdir"]  # (the fixture)


@contextlib.contextmanager
def hold_ike(ns: Namespaces, role: str, src: str, *, answers_only: bool = False
             ) -> Iterator[None]:  # fmt: skip
    """Drop, as namespace ``role`` receives them, the IKE datagrams ``src`` sends: UDP from
    port 500, or from port 4500 with the non-ESP marker (four zero octets where ESP in UDP
    has its SPI, RFC 3948); with ``answers_only`` only its responses (the R flag of the IKE
    header, octet 19 after the marker, or of the UDP payload on port 500: two ipsecct ends
    with no NAT between them keep IKE there). ESP in UDP always passes."""
    answer = " @th,248,8 & 0x20 == 0x20" if answers_only else ""
    rules = (
        "add table inet ict_hold\n"
        "add chain inet ict_hold in { type filter hook input priority 0; }\n"
        f"add rule inet ict_hold in ip saddr {src} udp sport 4500 @th,64,32 0{answer} drop\n"
    )
    # port 500: no marker, the R flag at octet 19 of the UDP payload
    answer500 = " @th,216,8 & 0x20 == 0x20" if answers_only else ""
    rules += f"add rule inet ict_hold in ip saddr {src} udp sport 500{answer500} drop\n"
    subprocess.run(ns.cmd(role, "nft", "-f", "-"), input=rules, text=True, check=True,
                   capture_output=True, timeout=30)  # fmt: skip
    try:
        yield
    finally:
        ns.run(role, "nft", "delete", "table", "inet", "ict_hold")


def requests_sent(ss: Charon, exchange: str = "CREATE_CHILD_SA") -> int:
    return len(re.findall(rf"generating {exchange} request", ss.log()))


def answers_sent(ss: Charon, exchange: str = "CREATE_CHILD_SA") -> int:
    return len(re.findall(rf"generating {exchange} response", ss.log()))


def crossed(ns: Namespaces, ss: Charon, gw: Daemon, first: str, ours: Callable[[], object],
            theirs: Callable[[], object], wait: Wait) -> None:  # fmt: skip
    """Start the same exchange at both ends so that each side gets the other's request
    while its own is unanswered, as when the two cross on the wire.

    ``first`` = "gateway": the gateway's IKE datagrams to strongSwan are held; ``ours`` is
    sent (held), then ``theirs``, which the gateway answers (held) with its own in flight;
    then only the gateway's answers are held, so that its request, sent again 2 s after
    the first, reaches strongSwan with its own still unanswered (not the gateway's answer
    to it, which strongSwan asks for again too); strongSwan answers, and the hold ends.

    "strongswan": strongSwan's datagrams are held; ``theirs`` is sent (held), then
    ``ours``, which strongSwan answers (held) with its own in flight; then only its answers
    are held, so that its request, sent again, reaches the gateway with ours still
    unanswered; the gateway answers, and the hold ends. Neither side's retransmission
    timers decide the order."""
    if first == "gateway":
        with hold_ike(ns, "a", B.outer):
            ours()
            theirs()
            wait(lambda: counters(gw).get("rekey-collision", 0) == 1,
                 "the gateway to answer strongSwan's request with its own in flight")
        with hold_ike(ns, "a", B.outer, answers_only=True):
            wait(lambda: re.search(r"detected \w+ collision with", ss.log()),
                 "strongSwan to answer the gateway's request with its own in flight")
        return
    n, m = answers_sent(ss), requests_sent(ss)
    with hold_ike(ns, "b", A.outer):
        theirs()
        wait(lambda: requests_sent(ss) > m, "strongSwan's request")
        ours()
        wait(lambda: answers_sent(ss) > n,
             "strongSwan to answer the gateway's request with its own in flight")
    with hold_ike(ns, "b", A.outer, answers_only=True):
        wait(lambda: counters(gw).get("rekey-collision", 0) == 1,
             "the gateway to answer strongSwan's request with its own in flight")


def ike_list(sock: str) -> list[dict[str, Any]]:
    """What ``ipsecct sa list --ike --json`` prints, asked on the control socket (the CLI is
    a Python start-up per call: 0.7 s, polled)."""
    out: list[dict[str, Any]] = ask(sock, "ike.list")
    return out


def counters(gw: Daemon) -> dict[str, int]:
    c: dict[str, int] = gw.status()["ike"]["counters"]
    return c


def drops(gw: Daemon) -> dict[str, int]:
    return {k: v for k, v in gw.status()["counters"]["drops"].items() if v}


def ss_children(ss: Charon) -> list[tuple[str, str]]:
    """strongSwan's installed CHILD SAs of child "net": (inbound SPI, outbound SPI)."""
    text = ss.list_sas()
    out = []
    for block in re.split(r"\n\s*net: #", text)[1:]:
        if "INSTALLED" not in block.split("\n", 1)[0]:
            continue
        i = re.search(r"\bin\s+([0-9a-f]{8})", block)
        o = re.search(r"\bout\s+([0-9a-f]{8})", block)
        if i and o:
            out.append((i.group(1), o.group(1)))
    return out


def gw_children(sock: str) -> list[tuple[str, str]]:
    """The gateway's CHILD SAs (inbound, outbound SPI), of its one IKE SA."""
    return [(c["spi_in"], c["spi_out"]) for ike in ike_list(sock) for c in ike["children"]]


def rekey(sock: str, *args: str) -> None:
    r = cli("sa", "rekey", *args, "-s", sock)
    assert r.returncode == 0 and "CREATE_CHILD_SA sent" in r.stdout, r.stdout + r.stderr


def inits(ss: Charon) -> int:
    return len(re.findall(r"generating IKE_SA_INIT request", ss.log()))


def context(ss: Charon, gw: Daemon) -> str:
    ike_log = "\n".join(x for x in ss.log().splitlines()
                        if "[ESP]" not in x and "[CHD]" not in x)  # fmt: skip
    return f"{ike_log[-12000:]}\n--- gateway ---\n{gw.logtext()[-12000:]}"


Wait = Callable[[Callable[[], object], str], None]


def waiting(ss: Charon, gw: Daemon) -> Wait:
    """wait_until (20 s) whose failure carries both sides' logs."""

    def wait(pred: Callable[[], object], what: str) -> None:
        try:
            wait_until(pred, what, 20)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{context(ss, gw)}") from None

    return wait


FIRST = pytest.mark.parametrize("first", ["gateway", "strongswan"])


class QuickInitiator(Initiator):
    """strongSwan sending its requests again after 1 s, not 4 s (what the holds wait for)."""

    def write_config(self) -> None:
        super().write_config()
        conf = self.dir / "strongswan.conf"
        text = conf.read_text()
        conf.write_text(text.replace("charon {", "charon {\n  retransmit_timeout = 1.0", 1))


def up(ns: Namespaces, workdir: Path, stack: contextlib.ExitStack
       ) -> tuple[Charon, Daemon, str, Wait]:  # fmt: skip
    """strongSwan connected to the gateway, a ping through: (charon, gateway, its control
    socket, a wait with both logs)."""
    _, gw = start(ns, workdir, ike="default", esp="default", ss_ike=None, ss_esp=None)
    ss = QuickInitiator(ns, workdir, ike=None, esp=None)
    stack.callback(gw.cleanup)
    stack.enter_context(ss)
    ss.start()
    ss.initiate()
    assert ping(ns, "a", B.inner, 2) == 2, context(ss, gw)
    return ss, gw, str(workdir / "gw.sock"), waiting(ss, gw)


def made_by_gateway(gw: Daemon) -> set[str]:
    """The inbound SPIs of CHILD SAs the gateway made as responder (peer's rekeys)."""
    return set(re.findall(r"event=child-sa-rekeyed conn=\S+ child=\S+ spi_in=([0-9a-f]{8})",
                          gw.logtext()))  # fmt: skip


@pytest.mark.root
@pytest.mark.slow
@needs_strongswan
@FIRST
def test_crossed_child_rekeys_leave_one_and_the_same_child_sa_at_both_ends(
    workdir: Path, first: str
) -> None:
    """§2.8.1: the gateway and strongSwan rekey the CHILD SA at once (``ipsecct sa rekey``,
    ``swanctl --rekey --child``), each request reaching the other side while its own is
    unanswered. Both make a new CHILD SA; the one made by the exchange with the lowest
    nonce is redundant and deleted by the side that started that exchange, the old one by
    the winner. Exactly one CHILD SA is left at each end, the same SA pair (the gateway's
    inbound SPI is strongSwan's outbound and back), made by the exchange of the side that
    won (the gateway counts rekey-collision-won or -lost, strongSwan logs the other), with
    no IKE_SA_INIT again; a ping every 0.1 s through it all loses nothing, traffic flows
    both ways after it, and the gateway dropped nothing."""
    with Namespaces("a", "b") as ns, contextlib.ExitStack() as stack:
        ss, gw, sock, wait = up(ns, workdir, stack)
        ((old_in, old_out),) = gw_children(sock)
        # a ping runs through it all (ESP is never held): none lost (every reply waited for)
        pinger = Pinger(ns, "a", B.inner, gap=0.1)
        stack.callback(pinger.kill)
        crossed(ns, ss, gw, first, lambda: rekey(sock, f"0x{old_in}"),
                lambda: ss.swanctl("--rekey", "--child", "net"), wait)  # fmt: skip
        wait(lambda: re.search(r"detected CHILD_REKEY collision with CHILD_REKEY", ss.log()),
             "strongSwan to answer the gateway's request with its own in flight")

        def settled() -> bool:
            g, s = gw_children(sock), ss_children(ss)
            c = counters(gw)
            return (len(g) == 1 and len(s) == 1 and g[0][0] not in (old_in, old_out)
                    and c.get("rekey-collision-won", 0) + c.get("rekey-collision-lost", 0) == 1
                    and gw.status()["sas"] == 2)  # fmt: skip

        wait(settled, "one new CHILD SA at each end")
        assert ping(ns, "a", B.inner, 2) == 2, context(ss, gw)  # (the pinger's last through)
        pinged = pinger.stop()
        assert pinged.sent >= 20 and not pinged.lost, (pinged, context(ss, gw))
        ((g_in, g_out),) = gw_children(sock)
        ((s_in, s_out),) = ss_children(ss)
        assert (g_in, g_out) == (s_out, s_in), (g_in, g_out, s_in, s_out)
        gw_lost = counters(gw).get("rekey-collision-lost", 0) == 1
        # the survivor was made by the winner's exchange: the gateway made it as responder
        # exactly when it lost
        assert (g_in in made_by_gateway(gw)) == gw_lost, context(ss, gw)
        log = ss.log()
        ss_lost = re.search(r"CHILD_SA rekey collision lost|rekey/delete collision, deleting"
                            r" redundant", log) is not None  # fmt: skip
        assert ss_lost != gw_lost, context(ss, gw)
        assert ping(ns, "a", B.inner, 5) == 5, context(ss, gw)
        assert ping(ns, "b", A.inner, 5) == 5, context(ss, gw)
        assert drops(gw) == {}, drops(gw)
        assert inits(ss) == 1, context(ss, gw)


def ike_spis(sock: str) -> list[tuple[str, str, str]]:
    """The gateway's established IKE SAs: (SPIi, SPIr, its role in the rekey that made it)."""
    return [(x["spi_i"], x["spi_r"], x["role"]) for x in ike_list(sock)
            if x["state"] == "established"]  # fmt: skip


def ss_ike_spis(ss: Charon) -> list[tuple[str, str]]:
    return re.findall(r"cA: #\d+, ESTABLISHED, IKEv2, ([0-9a-f]{16})_i\*? ([0-9a-f]{16})_r",
                      ss.list_sas())  # fmt: skip


@pytest.mark.root
@pytest.mark.slow
@needs_strongswan
@FIRST
def test_crossed_ike_rekeys_leave_one_and_the_same_ike_sa_with_its_child_sa(
    workdir: Path, first: str
) -> None:
    """§2.8.2: the gateway and strongSwan rekey the IKE SA at once (``ipsecct sa rekey
    --ike``, ``swanctl --rekey --ike``), crossed as for the CHILD SA. The IKE SA made by
    the exchange with the lowest nonce is redundant, the old one deleted by the winner;
    the CHILD SA, untouched, moves to the surviving IKE SA on both sides. One IKE SA is
    left established at each end with the same SPIs, made by the winner's exchange, the
    CHILD SA the one it was; no IKE_SA_INIT again, traffic flows, nothing dropped, and a
    CHILD rekey in the new IKE SA is answered."""
    with Namespaces("a", "b") as ns, contextlib.ExitStack() as stack:
        ss, gw, sock, wait = up(ns, workdir, stack)
        ((old_i, old_r, _),) = ike_spis(sock)
        child = gw_children(sock)
        crossed(ns, ss, gw, first, lambda: rekey(sock, "--ike", "roadwarrior"),
                lambda: ss.swanctl("--rekey", "--ike", "cA"), wait)  # fmt: skip
        wait(lambda: re.search(r"detected IKE_REKEY collision with IKE_REKEY", ss.log()),
             "strongSwan to answer the gateway's request with its own in flight")

        def settled() -> bool:
            g, s = ike_spis(sock), ss_ike_spis(ss)
            c = counters(gw)
            return (len(g) == 1 and len(s) == 1 and g[0][:2] != (old_i, old_r)
                    and c.get("rekey-collision-won", 0) + c.get("rekey-collision-lost", 0) == 1)

        wait(settled, "one new IKE SA at each end")
        ((spi_i, spi_r, role),) = ike_spis(sock)
        assert [(spi_i, spi_r)] == ss_ike_spis(ss), (ike_spis(sock), ss.list_sas())
        gw_lost = counters(gw).get("rekey-collision-lost", 0) == 1
        assert (role == "responder") == gw_lost, context(ss, gw)  # made by the winner
        assert gw_children(sock) == child  # the CHILD SA is not rekeyed by it
        assert ss_children(ss) == [(child[0][1], child[0][0])], ss.list_sas()
        if not gw_lost:
            # charon lost: it deleted its redundant IKE SA, or (its request unanswered when
            # our DELETE of the old one came) dropped it unsaid, listing the survivor alone;
            # our copy, if still listed rekeyed, goes within REDUNDANT_GRACE (30 s: charon's
            # own wait for a peer's redundant IKE SA when it wins); it stayed 60 s
            wait_until(lambda: re.findall(r"cA: #\d+, (\w+), IKEv2", ss.list_sas())
                       == ["ESTABLISHED"], "charon lists more than the survivor", 5)
            wait_until(lambda: [x["state"] for x in ike_list(sock)] == ["established"],
                       "our copy of charon's redundant IKE SA still listed", 33)
        assert ping(ns, "a", B.inner, 5) == 5, context(ss, gw)
        assert drops(gw) == {}, drops(gw)
        assert inits(ss) == 1, context(ss, gw)
        # the surviving IKE SA works: a CHILD rekey in it, answered
        ask(sock, "ike.rekey", {"spi": f"0x{child[0][0]}"})
        wait(lambda: len(gw_children(sock)) == 1 and gw_children(sock) != child
             and len(ss_children(ss)) == 1 and ss_children(ss)[0][0] == gw_children(sock)[0][1],
             "a CHILD rekey in the surviving IKE SA")  # fmt: skip
        assert ping(ns, "a", B.inner, 3) == 3, context(ss, gw)


@pytest.mark.root
@pytest.mark.slow
@needs_strongswan
@pytest.mark.parametrize("deleter", ["gateway", "strongswan"])
def test_a_child_rekey_crossing_a_delete_of_that_child_sa_leaves_none(
    workdir: Path, deleter: str
) -> None:
    """§2.25: one side deletes the CHILD SA (``ipsecct sa delete``, ``swanctl --terminate
    --child``) while the other rekeys it, each request reaching the other side after it
    sent its own (the gateway's datagrams held meanwhile). The DELETE wins: the rekey is
    refused (CHILD_SA_NOT_FOUND) or comes to nothing, no CHILD SA is left at either end
    (none half made, no SPI kept), the IKE SA stays at both, and a CHILD SA asked for again
    in it carries traffic, with no IKE_SA_INIT again. (strongSwan answered CHILD_SA_NOT_FOUND
    before it had the DELETE makes a new CHILD SA: not this test, the holds order them.)"""
    with Namespaces("a", "b") as ns, contextlib.ExitStack() as stack:
        ss, gw, sock, wait = up(ns, workdir, stack)
        ((old_in, _),) = gw_children(sock)
        ((ike_i, ike_r, _),) = ike_spis(sock)
        terminate: subprocess.Popen[str] | None = None
        with hold_ike(ns, "a", B.outer):
            if deleter == "gateway":
                r = cli("sa", "delete", f"0x{old_in}", "-s", sock)
                assert r.returncode == 0, r.stderr
                ss.swanctl("--rekey", "--child", "net")
                wait(lambda: counters(gw).get("rekey-unknown-child", 0) == 1,
                     "the gateway to refuse the rekey of the CHILD SA it deleted")
            else:
                rekey(sock, f"0x{old_in}")
                terminate = subprocess.Popen(
                    [SWANCTL, "--terminate", "--child", "net", "--uri", ss.uri],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                stack.callback(terminate.kill)
                wait(lambda: counters(gw).get("child-deleted-by-peer", 0) == 1,
                     "the gateway to take strongSwan's DELETE with its rekey in flight")
        # then only the gateway's answers are held: its own request, sent again, reaches
        # strongSwan (whose own is still unanswered) before the answer to strongSwan's
        with hold_ike(ns, "a", B.outer, answers_only=True):
            if deleter == "gateway":
                wait(lambda: "received DELETE for ESP CHILD_SA" in ss.log(),
                     "strongSwan to take the DELETE with its rekey in flight")
            else:
                wait(lambda: counters(gw).get("rekey-failed", 0) == 1,
                     "strongSwan to answer the rekey of the CHILD SA it deletes")
        if terminate is not None:
            out, _ = terminate.communicate(timeout=30)
            assert terminate.returncode == 0, out + context(ss, gw)

        def settled() -> bool:
            c = counters(gw)
            done = (c.get("rekey-failed", 0) == 1 if deleter == "strongswan"  # its answer
                    else re.search(r"parsed CREATE_CHILD_SA response \d+ \[ N\(NO_CHILD_SA\)",
                                   ss.log()) is not None)  # fmt: skip
            return (done and gw_children(sock) == [] and ss_children(ss) == []
                    and gw.status()["sas"] == 0)

        wait(settled, "no CHILD SA left at either end")
        # what is gone is refused by name, one line (as sa delete does)
        for args, why in (([f"0x{old_in}"], f"no IKE-keyed CHILD SA with SPI 0x{old_in}"),
                          (["--ike", "nosuch"], "no IKE SA, connection or SPI 'nosuch'")):
            r = cli("sa", "rekey", *args, "-s", sock)
            assert r.returncode == 2 and why in r.stderr, r.stderr
            assert len(r.stderr.splitlines()) == 1, r.stderr
        assert [x[:2] for x in ike_spis(sock)] == [(ike_i, ike_r)] == ss_ike_spis(ss)
        # the child again, in the same IKE SA
        ss.swanctl("--initiate", "--child", "net")
        wait(lambda: len(gw_children(sock)) == 1 and len(ss_children(ss)) == 1,
             "a new CHILD SA in the same IKE SA")
        assert ping(ns, "a", B.inner, 3) == 3, context(ss, gw)
        assert drops(gw) == {}, drops(gw)
        assert inits(ss) == 1, context(ss, gw)


def both(gw_sock: str, mn_sock: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    return gw_children(gw_sock), gw_children(mn_sock)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["child", "ike"])
def test_crossed_rekeys_between_two_ipsecct_engines_over_real_sockets(
    workdir: Path, kind: str
) -> None:
    """§2.8.1 and §2.8.2 with our code at both ends: ``ipsecct node`` (namespace "a",
    initiator) and ``ipsecct gateway`` ("b") rekey the same CHILD SA, or the IKE SA, at once
    (``sa rekey`` at both), crossed as with strongSwan (the gateway first; its datagrams to
    the node held, then only its answers). Each side counts the collision, one won and the
    other lost; one SA is left at each end, the same (CHILD SA: SPIs mirrored; IKE SA: the
    same SPIs, the CHILD SA untouched), traffic flows both ways, neither dropped anything."""
    with Namespaces("a", "b") as ns, contextlib.ExitStack() as stack:
        build_namespaces(ns)
        gconf = gateway_config(workdir, ike="aes256gcm16-prfsha384-ecp384",
                               esp="aes128-sha256", encap=False, dpd=0)  # fmt: skip
        mconf = node_config(workdir)
        mconf.write_text(mconf.read_text().replace("dpd_delay = 1", "dpd_delay = 0"))
        gw = Daemon("gateway", gconf, str(workdir / "gw.sock"), workdir / "gw.log",
                    prefix=["ip", "netns", "exec", ns.names["b"]])  # fmt: skip
        mn = Daemon("node", mconf, str(workdir / "mn.sock"), workdir / "mn.log",
                    prefix=["ip", "netns", "exec", ns.names["a"]])  # fmt: skip
        stack.callback(gw.cleanup)
        stack.callback(mn.cleanup)
        gw.start()
        mn.start()
        gs, ms = str(workdir / "gw.sock"), str(workdir / "mn.sock")

        def logs() -> str:
            return (f"--- node ---\n{mn.logtext()[-10000:]}\n"
                    f"--- gateway ---\n{gw.logtext()[-10000:]}")  # fmt: skip

        def wait(pred: Callable[[], object], what: str) -> None:
            try:
                wait_until(pred, what, 20)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{logs()}") from None

        wait(lambda: len(gw_children(gs)) == 1 and len(gw_children(ms)) == 1,
             "the node's IKE SA and CHILD SA at both ends")
        assert ping(ns, "a", B.inner, 2) == 2, logs()
        ((g_old, _),), ((m_old, _),) = both(gs, ms)
        old_ike = ike_spis(gs)
        if kind == "child":
            ours, theirs = {"spi": f"0x{g_old}"}, {"spi": f"0x{m_old}"}
        else:
            ours, theirs = {"ike": "roadwarrior"}, {"ike": "home"}
        with hold_ike(ns, "a", B.outer):
            ask(gs, "ike.rekey", ours)
            ask(ms, "ike.rekey", theirs)
            wait(lambda: counters(gw).get("rekey-collision", 0) == 1,
                 "the gateway to answer the node's request with its own in flight")
        with hold_ike(ns, "a", B.outer, answers_only=True):
            wait(lambda: counters(mn).get("rekey-collision", 0) == 1,
                 "the node to answer the gateway's request with its own in flight")

        def resolved(d: Daemon) -> int:
            c = counters(d)
            return c.get("rekey-collision-won", 0) + c.get("rekey-collision-lost", 0)

        def settled() -> bool:
            (g, m), gi, mi = both(gs, ms), ike_spis(gs), ike_spis(ms)
            return (resolved(gw) == 1 and resolved(mn) == 1 and len(g) == 1 and len(m) == 1
                    and len(gi) == 1 and len(mi) == 1
                    and gw.status()["sas"] == 2 and mn.status()["sas"] == 2)  # fmt: skip

        wait(settled, "one SA left at each end")
        won = [counters(d).get("rekey-collision-won", 0) for d in (gw, mn)]
        assert sorted(won) == [0, 1], (won, logs())
        ((g_in, g_out),), ((m_in, m_out),) = both(gs, ms)
        assert (g_in, g_out) == (m_out, m_in), logs()
        ((gi, gr, grole),), ((mi, mr, mrole),) = ike_spis(gs), ike_spis(ms)
        assert (gi, gr) == (mi, mr) and grole != mrole, logs()
        if kind == "child":
            assert g_in != g_old and m_in != m_old, logs()
            assert [x[:2] for x in old_ike] == [(gi, gr)]  # the IKE SA stays
        else:
            assert (g_in, m_in) == (g_old, m_old), logs()  # the CHILD SA moves untouched
            assert [x[:2] for x in old_ike] != [(gi, gr)]
            assert (grole == "initiator") == (won[0] == 1), logs()  # made by the winner
        assert ping(ns, "a", B.inner, 5) == 5, logs()
        assert ping(ns, "b", A.inner, 5) == 5, logs()
        assert drops(gw) == {} and drops(mn) == {}, (drops(gw), drops(mn))
