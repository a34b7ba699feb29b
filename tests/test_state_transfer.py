"""Durable ownership across transfers and fail-over (issue 8 §1), with real gateway processes
on loopback: a rebalance of many tunnels sg1 -> sg2 under traffic with sg1 killed by SIGKILL
at random moments of it and restarted; the receiver restarted; a fail-over active restarted
after its standby took over. Every ESP datagram either gateway sends to the mobile nodes is
read off the wire: no (SPI, sequence number) pair is ever sent twice, and once things have
settled no tunnel is sent on by two gateways."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipsecct.errors import ControlError
from ipsecct.gateway.control import request
from tests.helpers.control import ask, socket_of
from tests.helpers.state import Capture, Gateways, Traffic, capturing

pytestmark = pytest.mark.slow

# IPSECCT_TEST_TUNNELS=1500 runs the scale (a few minutes on 2 cores).
TUNNELS = int(os.environ.get("IPSECCT_TEST_TUNNELS", "150"))


@pytest.fixture
def gws(tmp_path: Path) -> Iterator[Gateways]:
    with capturing(tmp_path, TUNNELS) as g:
        yield g


def wait_for(pred, what: str, timeout: float = 45.0, detail=None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(what + (f": {detail()}" if detail is not None else ""))
        time.sleep(0.05)


def senders_since(cap: Capture, since: float) -> dict[int, set[int]]:
    """SPI -> the outer ports it was sent from after ``since``."""
    out: dict[int, set[int]] = defaultdict(set)
    for spi, _, port, t in list(cap.seen):
        if t >= since:
            out[spi].add(port)
    return out


def settled(gws: Gateways, names: list[str]) -> bool:
    """No transfer in progress, and no tunnel whose transfer's outcome is being asked."""
    for n in names:
        st = gws.status(n)
        if st.get("transfers", {}).get("in_progress", 0) or st["state"]["unresolved"]:
            return False
    return True


def rebalance_rounds(gws: Gateways, rnd: random.Random, victim: str) -> Iterator[None]:
    """Up to four rounds: sg1 moves half its remaining tunnels to sg2 with a rebalance while
    ``victim`` is killed by SIGKILL at a random moment of that exchange (the first at once),
    then restarted; each round ends once no transfer is in progress (yielded then)."""
    sock = str(gws.dir / "sg1.sock")
    span = 0.12 * TUNNELS / 150  # a bigger exchange takes longer
    for delay in (0.0, *sorted(rnd.uniform(0.0, span) for _ in range(3))):
        left = TUNNELS - len(gws.status("sg1")["state"]["kept_away"])
        if left == 0:
            return

        def rebalance(n: int = left) -> None:
            with contextlib.suppress(ControlError, OSError):
                request(sock, "rebalance", {"to": "sg2", "count": max(1, n // 2)}, 30)

        th = threading.Thread(target=rebalance)
        th.start()
        time.sleep(delay)
        gws.kill(victim)
        th.join(30)
        gws.start(victim)
        wait_for(lambda: settled(gws, ["sg1", "sg2"]), "transfers did not settle")
        yield


def one_sender_each(gws: Gateways, cap: Capture) -> tuple[set[int], set[int]]:
    """After the rounds: the SPIs active at sg1 and at sg2, once 1.5 s of traffic showed that
    no tunnel is active on both and none was sent from both gateways' ports.

    A source still sends up to ``mbb_tail`` (16) numbers of a tunnel it moved, after its
    COMMIT, on what reaches it from the inner side (below the target's first: docs/cxtp.md,
    "the tail"); that ends by count, and is waited for first (status polls through the
    command line used to take longer than it does)."""
    held = {n: gws.active_spis(n) for n in ("sg1", "sg2")}
    port = {n: gws.ports[n]["outer"] for n in ("sg1", "sg2")}

    def tails_used() -> bool:
        cap.sync()
        t = time.monotonic()
        time.sleep(0.3)
        cap.sync()
        return not any(port[n] in p and spi in held[m]
                       for spi, p in senders_since(cap, t).items()
                       for n, m in (("sg1", "sg2"), ("sg2", "sg1")))  # fmt: skip

    wait_for(tails_used, "a gateway goes on sending on tunnels the other holds", timeout=20)
    cap.sync()  # what was sent before settling is not taken for what is sent after
    t0 = time.monotonic()
    time.sleep(1.5)
    cap.sync()
    one, two = gws.active_spis("sg1"), gws.active_spis("sg2")
    assert not one & two, "a tunnel is active on both gateways"
    ports = senders_since(cap, t0)
    both = {hex(spi) for spi, p in ports.items() if len(p) > 1}
    assert not both, f"sent by two gateways after settling: {sorted(both)[:5]}"
    return one, two


def test_rebalance_with_the_source_killed_mid_transfer_never_repeats_a_number(
    gws: Gateways,
) -> None:
    """Three rounds: sg1 moves its remaining tunnels to sg2 with ``ipsecct rebalance`` while
    traffic flows, and is killed by SIGKILL at a random moment of that exchange (before it,
    while contexts are in flight, around the commit, after it), then restarted."""
    cap: Capture = gws.capture  # type: ignore[attr-defined]
    gws.write("sg1", peers=["sg2"])
    gws.write("sg2", peers=["sg1"], with_tunnels=False)
    gws.start("sg2")
    gws.start("sg1")
    traffic = Traffic(
        TUNNELS, [gws.ports["sg1"]["inner"], gws.ports["sg2"]["inner"]], pps=3000
    )
    rnd = random.Random(81)
    try:
        wait_for(lambda: len(cap.seen) > 500, "no traffic")
        for _ in rebalance_rounds(gws, rnd, victim="sg1"):
            pass
        # what sg1 gave away stays away; what it kept resumes; nothing was sent twice
        st1 = gws.status("sg1")["state"]
        away = {a["name"] for a in st1["kept_away"]}
        assert all(a["owner"] in ("away",) for a in st1["kept_away"]), st1["kept_away"]
        assert away, "no round got as far as a commit: the test proves nothing"
        _, two = one_sender_each(gws, cap)
        assert cap.duplicates() == []
        # the tunnels sg1 says it gave away are the ones sg2 serves: a kill between the
        # durable "given away" and the COMMIT leaving is answered after the restart, when sg2
        # asks for the decision again
        given = {0x20000000 + int(n[1:]) for n in away}
        assert given == two
    finally:
        traffic.close()


def test_rebalance_with_the_target_killed_mid_transfer_never_repeats_a_number(
    gws: Gateways,
) -> None:
    """Make-before-break from the target's side: sg1 goes on sending below each tunnel's cap
    while it moves them, sg2 starts past the cap once committed. sg2 is killed by SIGKILL
    twice at moments chosen (its contexts installed, waiting for a COMMIT that never comes;
    just after a rebalance committed), then at random moments of rebalances (before the
    contexts arrive, while it installs them or waits for the COMMIT, just after it), and
    restarted each time: sg1 takes back what did not commit and sends on it past the cap,
    what committed stays away from sg1 (and is lost with sg2's memory: not restored,
    docs/state.md). Nothing is sent twice, no tunnel by both."""
    cap: Capture = gws.capture  # type: ignore[attr-defined]
    gws.write("sg1", peers=["sg2"])
    gws.write("sg2", peers=["sg1"], with_tunnels=False)
    gws.start("sg2")
    gws.start("sg1")
    traffic = Traffic(
        TUNNELS, [gws.ports["sg1"]["inner"], gws.ports["sg2"]["inner"]], pps=3000
    )
    sock1 = str(gws.dir / "sg1.sock")
    rnd = random.Random(82)
    outcomes: dict[str, str] = {}  # transfer id -> sg1's outcome

    def restart_sg2() -> None:
        gws.kill("sg2")
        gws.start("sg2")
        wait_for(lambda: settled(gws, ["sg1", "sg2"]), "transfers did not settle")
        outcomes.update((r["id"], r["outcome"]) for r in gws.status("sg1")["transfers"]["recent"])

    try:
        wait_for(lambda: len(cap.seen) > 500, "no traffic")
        # Killed before the COMMIT, its contexts arrived: a prepared transfer (sg2 holds
        # them installed, arriving, until a COMMIT that sg1 never sends), whatever the timing.
        spi = 0x20000000
        rec = request(sock1, "transfer", {"spi": hex(spi), "to": "sg2", "prepare": True}, 30)
        assert rec["outcome"] == "prepared", rec
        wait_for(
            lambda: {s["state"] for s in ask(socket_of(gws.config("sg2")), "sa.list")}
            == {"arriving"},
            "sg2 does not hold the prepared transfer's SAs arriving",
        )
        restart_sg2()
        assert outcomes[rec["id"]] not in ("committed", "in progress"), outcomes
        # Killed just after a COMMIT: a rebalance sg1 answered committed.
        rec = request(sock1, "rebalance", {"to": "sg2", "count": 10}, 30)
        assert rec["outcome"] == "committed", rec
        restart_sg2()
        for _ in rebalance_rounds(gws, rnd, victim="sg2"):
            outcomes.update(
                (r["id"], r["outcome"]) for r in gws.status("sg1")["transfers"]["recent"]
            )
        one, _ = one_sender_each(gws, cap)
        # the invariant first; then that the kills came on both sides of a COMMIT
        assert cap.duplicates() == []
        seen = set(outcomes.values())
        assert "committed" in seen and seen - {"committed"}, outcomes
        # every tunnel sg1 did not record as given away, it sends on (a restart of sg1
        # lists what it recorded)
        gws.kill("sg1")
        gws.start("sg1")
        st1 = gws.status("sg1")["state"]
        away = {0x20000000 + int(a["name"][1:]) for a in st1["kept_away"]}
        assert len(one) + len(away) == TUNNELS and not one & away
        assert gws.active_spis("sg1") == one
        assert cap.duplicates() == []
    finally:
        traffic.close()


def wait_for_line(path: Path, offset: int, words: tuple[str, ...], timeout: float = 30.0) -> None:
    """Poll ``path`` from ``offset`` until a line holds every one of ``words`` (at once: the
    caller kills the process the moment it says so)."""
    deadline = time.monotonic() + timeout
    with open(path, "rb") as f:
        f.seek(offset)
        buf = b""
        while time.monotonic() < deadline:
            buf += f.read()
            for line in buf.split(b"\n"):
                if all(w.encode() in line for w in words):
                    return
            time.sleep(0.0005)
    raise AssertionError(f"no line with {words} in {path}")


def test_a_source_killed_right_after_its_commit_never_sends_on_the_moved_tunnel(
    gws: Gateways,
) -> None:
    """sg1 hands one tunnel at a time to sg2 (``ipsecct transfer``) under traffic and is killed
    by SIGKILL the moment its log says the transfer committed (the COMMIT was handed to the
    socket; "given away" was durable before it), then restarted: it keeps the tunnel away
    and never sends with that SA again, sg2 serves it, and no (SPI, sequence number) pair
    is sent twice."""
    cap: Capture = gws.capture  # type: ignore[attr-defined]
    gws.write("sg1", peers=["sg2"])
    gws.write("sg2", peers=["sg1"], with_tunnels=False)
    gws.start("sg2")
    gws.start("sg1")
    traffic = Traffic(
        TUNNELS, [gws.ports["sg1"]["inner"], gws.ports["sg2"]["inner"]], pps=3000
    )
    sg1_port = gws.ports["sg1"]["outer"]
    moved: set[int] = set()
    try:
        wait_for(lambda: len(cap.seen) > 500, "no traffic")
        sock = str(gws.dir / "sg1.sock")
        log = gws.dir / "sg1.log"
        for i in (0, 1, 2):
            spi = 0x20000000 + i
            offset = log.stat().st_size

            def transfer(spi: int = spi) -> None:
                with contextlib.suppress(ControlError, OSError):
                    request(sock, "transfer", {"spi": hex(spi), "to": "sg2"}, 30)

            th = threading.Thread(target=transfer)
            th.start()
            wait_for_line(log, offset, ("event=transfer-committed", "role=source"))
            gws.kill("sg1")
            th.join(30)
            moved.add(spi)
            cap.sync()  # what sg1 sent before it died is read (and timed) before the restart
            restarted = time.monotonic()
            gws.start("sg1")
            wait_for(lambda: settled(gws, ["sg1", "sg2"]), "transfers did not settle")
            wait_for(lambda: moved <= gws.active_spis("sg2"), "sg2 does not serve them")
            # sg1 sends on its other tunnels again, never on a moved one
            def resumed(since: float = restarted) -> bool:
                return any(p == sg1_port and t >= since for _, _, p, t in list(cap.seen))

            wait_for(resumed, "sg1 sends nothing after its restart")
            after = {spi for spi, _, p, t in list(cap.seen) if p == sg1_port and t >= restarted}
            assert not after & moved, f"sg1 sent on moved tunnels: {sorted(after & moved)}"
        st1 = gws.status("sg1")["state"]
        assert {0x20000000 + int(a["name"][1:]) for a in st1["kept_away"]} == moved
        assert moved.isdisjoint(gws.active_spis("sg1"))
        cap.sync()
        t0 = time.monotonic()
        time.sleep(1.0)
        cap.sync()
        late = {spi for spi, _, p, t in list(cap.seen) if p == sg1_port and t >= t0}
        assert not late & moved
        assert cap.duplicates() == []
    finally:
        traffic.close()


def test_a_target_killed_after_taking_a_tunnel_back_never_repeats_a_number(
    gws: Gateways,
) -> None:
    """A tunnel configured at sg1 goes to sg2 and comes back to sg1 (sent on at each), then sg1
    is killed by SIGKILL: once the moment its log says it took the tunnel back (its "owned"
    row may not have landed: the tunnel then stays away), once half a second later (it
    resumes past its recorded ceiling). Nothing is ever sent twice."""
    cap: Capture = gws.capture  # type: ignore[attr-defined]
    gws.write("sg1", peers=["sg2"])
    gws.write("sg2", peers=["sg1"], with_tunnels=False)
    gws.start("sg2")
    gws.start("sg1")
    traffic = Traffic(
        TUNNELS, [gws.ports["sg1"]["inner"], gws.ports["sg2"]["inner"]], pps=3000
    )
    sg1_port = gws.ports["sg1"]["outer"]
    try:
        wait_for(lambda: len(cap.seen) > 500, "no traffic")
        log = gws.dir / "sg1.log"
        for i, pause in ((3, 0.0), (4, 0.5)):
            spi = 0x20000000 + i
            request(str(gws.dir / "sg1.sock"), "transfer", {"spi": hex(spi), "to": "sg2"}, 30)
            t_there = time.monotonic()

            def sent_since(since: float, port: int | None = None, spi: int = spi) -> list[int]:
                return [
                    q for s_, q, p, t in list(cap.seen)
                    if s_ == spi and t >= since and (port is None or p == port)
                ]

            wait_for(lambda t=t_there: len(sent_since(t)) > 3, "sg2 does not send on it")
            offset = log.stat().st_size
            request(str(gws.dir / "sg2.sock"), "transfer", {"spi": hex(spi), "to": "sg1"}, 30)
            wait_for_line(log, offset, ("event=transfer-committed", "role=target"))
            if pause:
                time.sleep(pause)
            gws.kill("sg1")
            cap.sync()  # what it sent before it died is read off the wire by now
            before = max(q for s_, q, _, _ in list(cap.seen) if s_ == spi)
            restarted = time.monotonic()
            gws.start("sg1")
            wait_for(lambda: settled(gws, ["sg1", "sg2"]), "transfers did not settle")
            if pause:
                # "owned" landed: it resumes, past everything sent under its keys
                wait_for(lambda s=spi: s in gws.active_spis("sg1"), "sg1 did not resume it")
                wait_for(
                    lambda t=restarted: len(sent_since(t, sg1_port)) > 3, "it sends nothing"
                )
                assert min(sent_since(restarted, sg1_port)) > before
            assert spi not in gws.active_spis("sg2")
        assert cap.duplicates() == []
    finally:
        traffic.close()


def test_a_receiver_restart_keeps_transferred_tunnels_away(gws: Gateways) -> None:
    """sg2 takes every tunnel over by transfer, is killed and restarted: it has no
    configuration (and no keys on disk) for them, so it does not restore them and says so;
    sg1 keeps them away too. Nobody sends on them, and nothing was sent twice."""
    cap: Capture = gws.capture  # type: ignore[attr-defined]
    gws.write("sg1", peers=["sg2"])
    gws.write("sg2", peers=["sg1"], with_tunnels=False)
    gws.start("sg2")
    gws.start("sg1")
    traffic = Traffic(TUNNELS, [gws.ports["sg1"]["inner"], gws.ports["sg2"]["inner"]])
    try:
        from tests.helpers.deployment import cli

        r = cli("rebalance", "--to", "sg2", "--count", str(TUNNELS), "-c", gws.config("sg1"))
        assert r.returncode == 0, r.stderr
        wait_for(lambda: len(gws.active_spis("sg2")) == TUNNELS, "sg2 did not take them")
        time.sleep(0.5)
        gws.kill("sg2")
        gws.start("sg2")
        st2 = gws.status("sg2")["state"]
        assert len(st2["not_restored"]) == TUNNELS
        assert gws.active_spis("sg2") == set()
        assert gws.active_spis("sg1") == set()
        cap.sync()  # what sg2 sent before it was killed is not taken for what came after
        t0 = time.monotonic()
        time.sleep(1.0)
        cap.sync()
        assert senders_since(cap, t0) == {}
        assert cap.duplicates() == []
        m = gws.status("sg2")["metrics"]
        assert m["state_tunnels_not_restored"] == TUNNELS
    finally:
        traffic.close()


def test_a_restarted_failover_active_does_not_send_beside_its_standby(gws: Gateways) -> None:
    """sg1 (active) killed, sg2 takes all its tunnels over (recorded, reserved past the
    margin), sg1 restarted with its configuration: it does not send beside sg2."""
    cap: Capture = gws.capture  # type: ignore[attr-defined]
    # A detection time a loaded machine cannot reach by starving sg1 (500 ms by default: a
    # CI run once saw sg2 take over while sg1 still started, and replication never completed)
    dead = "dead_ms = 5000\n"
    gws.write(
        "sg1", peers=["sg2"],
        extra='[failover]\nrole = "active"\npeer = "sg2"\n' + dead,
    )
    gws.write(
        "sg2", peers=["sg1"], with_tunnels=False,
        extra='[failover]\nrole = "standby"\npeer = "sg1"\n' + dead,
    )
    gws.start("sg2")
    gws.start("sg1")
    traffic = Traffic(TUNNELS, [gws.ports["sg1"]["inner"], gws.ports["sg2"]["inner"]])
    try:
        wait_for(
            lambda: gws.status("sg2")["failover"].get("replicated_tunnels") == TUNNELS,
            "nothing replicated",
            detail=lambda: (
                f"sg2 {gws.status('sg2')['failover']}\nsg1 {gws.status('sg1')['failover']}"
                f"\n{gws.log('sg1')[-3000:]}\n{gws.log('sg2')[-3000:]}"
            ),
        )
        gws.kill("sg1")
        wait_for(lambda: gws.status("sg2")["failover"]["role"] == "took over", "no take-over")
        gws.start("sg1")
        # fenced until the standby answers; the standby says it took over: tunnels removed
        wait_for(lambda: gws.active_spis("sg1") == set(), "the old active kept its tunnels")
        cap.sync()  # what sg1 sent before it was killed is not taken for what came after
        t0 = time.monotonic()
        time.sleep(1.0)
        cap.sync()
        ports = senders_since(cap, t0)
        assert len(ports) == TUNNELS and all(p == {gws.ports["sg2"]["outer"]}
                                             for p in ports.values())
        assert cap.duplicates() == []
        # the standby recorded the take-over with its reservations
        st2 = gws.status("sg2")["state"]
        assert st2["reservations"]["sas"] == TUNNELS
    finally:
        traffic.close()


# -- the decision query: a source restarted with "leaving" rows asks its target ----------------
@pytest.fixture
def few(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Two gateways with a few tunnels (the moments below are hit one tunnel at a time)."""
    cap = Capture()
    g = Gateways(tmp_path, cap.port, tunnels=6, block=64)
    g.capture = cap  # type: ignore[attr-defined]
    g.write("sg1", peers=["sg2"])
    g.write("sg2", peers=["sg1"], with_tunnels=False)
    g.start("sg2")
    g.start("sg1")
    traffic = Traffic(6, [g.ports["sg1"]["inner"], g.ports["sg2"]["inner"]], pps=600)
    yield g
    traffic.close()
    g.stop()
    cap.close()


def freeze(gws: Gateways, name: str, on: bool) -> None:
    """SIGSTOP (or SIGCONT) a gateway: it reads nothing, answers nothing, writes nothing."""
    os.kill(gws.procs[name].pid, signal.SIGSTOP if on else signal.SIGCONT)


def start_transfer(gws: Gateways, spi: int, to: str = "sg2") -> threading.Thread:
    """sg1's ``ipsecct transfer SPI --to TO``, on a thread of its own (it may never answer)."""
    sock = str(gws.dir / "sg1.sock")

    def transfer() -> None:
        with contextlib.suppress(ControlError, OSError):
            request(sock, "transfer", {"spi": hex(spi), "to": to}, 30)

    th = threading.Thread(target=transfer)
    th.start()
    return th


def served_by_one(gws: Gateways, cap: Capture, spi: int, port: dict[str, int]) -> str | None:
    """Once settled: which gateway sends on ``spi`` (None: nobody), from 0.6 s of traffic;
    never both, and the one active there is the one sending."""
    cap.sync()
    t0 = time.monotonic()
    time.sleep(0.6)  # about 60 datagrams of each tunnel
    cap.sync()
    ports = senders_since(cap, t0).get(spi, set())
    assert len(ports) <= 1, f"0x{spi:08x} sent by two gateways after settling"
    active = {n for n in ("sg1", "sg2") if spi in gws.active_spis(n)}
    assert len(active) <= 1, f"0x{spi:08x} active on {active}"
    by = {n for n in ("sg1", "sg2") if port[n] in ports}
    assert by == active, (by, active)
    return next(iter(by), None)


def test_a_source_restarted_with_a_leaving_row_asks_its_target(few: Gateways) -> None:
    """The decision query with real processes, SIGKILL and every ESP datagram off the wire.

    1. sg2 frozen (SIGSTOP: it answers nothing), sg1 starts moving a tunnel and is killed
       0.4 s later ("leaving" durable, no CTDR, no COMMIT); sg2 thawed, sg1 restarted: it
       holds the tunnel, logs that the outcome is unknown and asks sg2, which holds the
       transfer pending (the query is its COMMIT: "taken") or, if the query overtook the
       contexts still on the dead connection, "not taken" (and refuses them).
    2. The same, but sg2 is killed too before it read the contexts, and sg1 restarted alone:
       it holds the tunnel (never sends on it), lists it in ``status``
       (``state.unresolved``), logs ``event=transfer-outcome-unknown`` and asks every
       retry; once sg2 is back it answers "not taken" (it never installed the transfer) and
       sg1 sends on the tunnel again, past everything it sent before.
    3. sg1 killed the moment it sent its COMMIT, sg2 right after it: sg2 restarted answers
       from its durable record of the arrival (the tunnel went with its memory: nobody
       serves it) or, if its "pending" row had not landed, "not taken" (it never sent).
    4. and 5. (commit what you accept) sg1's early COMMIT whose answer does not come: it
       asks; sg2 killed before it read it and restarted ("not taken": sg1 sends again), or
       thawed (it activates; sg1 learns it in memory).

    Every time: nothing sent twice, and once settled the tunnel is sent on by at most one
    gateway (by none only when it went with sg2's memory)."""
    gws = few
    cap: Capture = gws.capture  # type: ignore[attr-defined]
    port = {n: gws.ports[n]["outer"] for n in ("sg1", "sg2")}
    log = gws.dir / "sg1.log"
    wait_for(lambda: len(cap.seen) > 100, "no traffic")

    def since(offset: int) -> str:
        return log.read_bytes()[offset:].decode(errors="replace")

    # 1. killed before the COMMIT, the target alive
    spi = 0x20000000
    offset = log.stat().st_size
    freeze(gws, "sg2", True)
    th = start_transfer(gws, spi)
    time.sleep(0.4)  # "leaving" durable (a synced write: a few ms), the CTDR never comes
    gws.kill("sg1")
    th.join(30)
    freeze(gws, "sg2", False)
    gws.start("sg1")
    wait_for(lambda: settled(gws, ["sg1", "sg2"]), "the query was not answered")
    assert "event=transfer-outcome-unknown" in since(offset)
    assert "event=transfer-resolved" in since(offset)
    assert served_by_one(gws, cap, spi, port) is not None

    # 2. the target down when the source restarts
    spi = 0x20000000 + 1
    freeze(gws, "sg2", True)
    th = start_transfer(gws, spi)
    offset = log.stat().st_size
    time.sleep(0.4)
    gws.kill("sg1")
    gws.kill("sg2")
    th.join(30)
    cap.sync()
    before = max(q for s_, q, _, _ in list(cap.seen) if s_ == spi)
    restarted = time.monotonic()
    gws.start("sg1")
    st = gws.status("sg1")
    (u,) = st["state"]["unresolved"]
    assert (int(u["spi"], 16), u["peer"]) == (spi, "sg2"), u
    assert st["metrics"]["state_tunnels_unresolved"] == 1
    assert "event=transfer-outcome-unknown" in since(offset)
    time.sleep(0.7)  # sg1 asks every retry_ms (500 ms); nobody answers
    cap.sync()
    assert not [q for s_, q, p, t in list(cap.seen) if s_ == spi and t >= restarted]
    assert gws.status("sg1")["state"]["unresolved"]
    gws.start("sg2")
    wait_for(lambda: settled(gws, ["sg1", "sg2"]), "the query was not answered")
    wait_for(
        lambda: any(s_ == spi and p == port["sg1"] and t >= restarted
                    for s_, _, p, t in list(cap.seen)),
        "sg1 does not send on the tunnel again",
    )
    assert min(q for s_, q, _, t in list(cap.seen) if s_ == spi and t >= restarted) > before
    details = [r["detail"] for r in gws.status("sg1")["transfers"]["recent"]]
    assert "not taken by sg2: kept" in details

    # 3. both killed around the COMMIT
    spi = 0x20000000 + 2
    offset = log.stat().st_size
    th = start_transfer(gws, spi)
    wait_for_line(log, offset, ("event=transfer-committed", "role=source"))
    gws.kill("sg1")
    gws.kill("sg2")
    th.join(30)
    gws.start("sg2")
    gws.start("sg1")
    wait_for(lambda: settled(gws, ["sg1", "sg2"]), "transfers did not settle")
    served_by_one(gws, cap, spi, port)
    assert spi not in gws.active_spis("sg2")  # not restored: its keys were never on disk

    # 4. commit what you accept (docs/cxtp.md; sg1 restarted with it): sg2 frozen, sg1's
    # COMMIT goes as soon as "leaving" is durable, no CTDR comes, and after max_transfer_ms
    # sg1 says the outcome is unknown and asks (the tunnel may be active at sg2: sent on by
    # nobody here past its tail). sg2 killed before it read anything and restarted: "not
    # taken"; sg1 records the tunnel owned again and sends on it past everything it sent
    # before.
    unknown = ("event=transfer-outcome-unknown", 'why="no answer in time"')
    gws.write("sg1", peers=["sg2"], transfer_extra="commit_early = true", max_transfer_ms=300)
    gws.kill("sg1")
    gws.start("sg1")
    spi = 0x20000000 + 3
    offset = log.stat().st_size
    freeze(gws, "sg2", True)
    th = start_transfer(gws, spi)
    wait_for_line(log, offset, unknown)
    cap.sync()
    before = max(q for s_, q, _, _ in list(cap.seen) if s_ == spi)
    asked = time.monotonic()
    assert gws.status("sg1")["transfers"]["in_progress"] == 1
    gws.kill("sg2")
    th.join(30)
    time.sleep(0.3)
    cap.sync()
    assert not [q for s_, q, _, t in list(cap.seen) if s_ == spi and t >= asked + 0.1]
    gws.start("sg2")
    wait_for(lambda: settled(gws, ["sg1", "sg2"]), "the query was not answered")
    assert served_by_one(gws, cap, spi, port) == "sg1"
    assert min(q for s_, q, _, t in list(cap.seen) if s_ == spi and t >= asked + 0.1) > before
    details = [r["detail"] for r in gws.status("sg1")["transfers"]["recent"]]
    assert "not taken by sg2: kept" in details

    # 5. the same, sg2 thawed while sg1 asks: it reads the contexts and the COMMIT
    # (active), and its late CTDR (or its answer) decides in sg1's memory.
    spi += 1
    offset = log.stat().st_size
    freeze(gws, "sg2", True)
    th = start_transfer(gws, spi)
    wait_for_line(log, offset, unknown)
    freeze(gws, "sg2", False)
    th.join(30)
    wait_for(lambda: settled(gws, ["sg1", "sg2"]), "the transfer did not settle")
    assert served_by_one(gws, cap, spi, port) == "sg2"
    assert cap.duplicates() == []


def test_a_query_after_the_target_pruned_the_arrival_is_answered_taken(few: Gateways) -> None:
    """The target keeps the ids of arrived transfers ``arrival_retention_s`` (2 s here, its
    clock-step margin 1 s), then prunes them (``state.arrivals`` in ``status``) and keeps only
    the newest arrival time pruned. sg1 moves a tunnel to sg2 and is killed after its COMMIT
    with its row still "leaving" (the crash before "away" lands: the row is put back as it
    was); sg2 serves the tunnel, prunes the arrival and is restarted (its memory gone, the
    tunnel not restored: its keys were never on disk). sg1 restarted asks, saying how old
    the transfer is: sg2, which no longer has its record but pruned arrivals as old as it,
    answers "taken", and sg1 never sends on the tunnel again (had it resumed past its stored
    ceiling, it would have repeated numbers sg2 sent)."""
    import sqlite3

    gws = few
    cap: Capture = gws.capture  # type: ignore[attr-defined]
    gws.write("sg2", peers=["sg1"], with_tunnels=False, extra="arrival_retention_s = 2")
    gws.kill("sg2")
    gws.start("sg2")
    wait_for(lambda: len(cap.seen) > 100, "no traffic")
    port = {n: gws.ports[n]["outer"] for n in ("sg1", "sg2")}
    log = gws.dir / "sg1.log"
    spi = 0x20000000 + 3
    offset = log.stat().st_size
    log2 = gws.dir / "sg2.log"
    offset2 = log2.stat().st_size
    th = start_transfer(gws, spi)
    wait_for_line(log, offset, ("event=transfer-committed", "role=source"))
    # The source logs its decision when it hands the COMMIT to its channel, whose writer
    # task may still hold it queued: killed at once, sg1 could lose the COMMIT, and sg2 then
    # rightly never activates. Killed once sg2 has committed (this test's case: the target
    # serves the tunnel while the source's row says "leaving").
    wait_for_line(log2, offset2, ("event=transfer-committed", "role=target"))
    gws.kill("sg1")
    th.join(30)
    db = sqlite3.connect(gws.dir / "state-sg1" / "state.db", isolation_level=None)
    n = db.execute(
        "UPDATE sa SET owner = 'leaving', detail = 'transferring to sg2' WHERE spi = ?", (spi,)
    ).rowcount
    # this connection's close copies the killed run's write-ahead log into state.db and
    # removes it: nothing lost, which the restart cannot tell (docs/state.md says so)
    db.execute("UPDATE meta SET value = 'closed' WHERE key = 'run'")
    db.close()
    assert n == 1
    wait_for(lambda: any(s_ == spi and p == port["sg2"] for s_, _, p, _ in list(cap.seen)),
             "sg2 does not send on the tunnel")  # fmt: skip
    arrivals: Callable[[], dict[str, Any]] = lambda: gws.status("sg2")["state"]["arrivals"]  # noqa: E731
    wait_for(lambda: arrivals()["pruned"] >= 1 and arrivals()["kept"] == 0,
             "sg2 never pruned the arrival", detail=arrivals)  # fmt: skip
    gws.kill("sg2")
    gws.start("sg2")
    assert gws.status("sg2")["state"]["arrivals"]["kept"] == 0
    offset = log.stat().st_size
    gws.start("sg1")
    lines = log.read_text()[offset:].splitlines()
    unknown = [ln for ln in lines if "transfer-outcome-unknown" in ln]
    assert len(unknown) == 1 and "tunnel=t3" in unknown[0], unknown
    wait_for(lambda: settled(gws, ["sg1", "sg2"]), "the query was not answered")
    details = [r["detail"] for r in gws.status("sg1")["transfers"]["recent"]]
    assert "taken by sg2" in details, details
    assert served_by_one(gws, cap, spi, port) is None  # went with sg2's memory
    assert cap.duplicates() == []


def test_a_target_that_gave_up_on_the_commit_answers_not_taken_after_both_restarted(
    few: Gateways,
) -> None:
    """sg2 frozen, sg1 starts moving a tunnel and is killed ("leaving" durable, no COMMIT);
    sg2 thawed reads the contexts, installs the tunnel pending and gives up waiting for the
    COMMIT (retry_max_ms, 1.5 s here: "no decision from the source"), recorded durably;
    sg2 is killed and restarted, then sg1: sg2 knows the transfer only from its store and
    answers "not taken", and sg1 sends on the tunnel again past everything it sent (before
    the record of the give-up, the answer from the store was "taken": the tunnel was
    served by nobody). Nothing is sent twice."""
    import sqlite3

    gws = few
    cap: Capture = gws.capture  # type: ignore[attr-defined]
    cfg = Path(gws.config("sg2"))
    cfg.write_text(cfg.read_text().replace("retry_max_ms = 20000", "retry_max_ms = 1500"))
    gws.kill("sg2")
    gws.start("sg2")
    wait_for(lambda: len(cap.seen) > 100, "no traffic")
    port = {n: gws.ports[n]["outer"] for n in ("sg1", "sg2")}
    log2 = gws.dir / "sg2.log"
    # another tunnel moved first: the channel to sg2 is up (its TLS handshake done) before
    # sg2 is frozen, so that the contexts reach its socket
    start_transfer(gws, 0x20000000 + 4).join(30)
    wait_for(lambda: settled(gws, ["sg1", "sg2"]), "the first transfer did not settle")
    spi = 0x20000000 + 5
    freeze(gws, "sg2", True)
    th = start_transfer(gws, spi)
    time.sleep(0.4)  # "leaving" durable (a synced write: a few ms), the CTDR never comes
    gws.kill("sg1")
    th.join(30)
    cap.sync()
    before = max(q for s_, q, _, _ in list(cap.seen) if s_ == spi)
    offset2 = log2.stat().st_size
    freeze(gws, "sg2", False)
    wait_for_line(log2, offset2, ("event=transfer-cancelled", "no decision from the source"))

    def outcomes() -> list[tuple[str, ...]]:
        """The arrivals' outcomes (the first transfer's, this one's), this tunnel's owner."""
        db = sqlite3.connect(gws.dir / "state-sg2" / "state.db", isolation_level=None)
        try:
            return [
                *db.execute("SELECT outcome FROM arrival ORDER BY outcome").fetchall(),
                *db.execute("SELECT owner FROM sa WHERE spi = ?", (spi,)).fetchall(),
            ]
        finally:
            db.close()

    wait_for(lambda: outcomes() == [("",), ("discarded",), ("away",)],
             "the give-up is not recorded", timeout=5, detail=outcomes)  # fmt: skip
    gws.kill("sg2")
    gws.start("sg2")
    restarted = time.monotonic()
    gws.start("sg1")
    wait_for(lambda: settled(gws, ["sg1", "sg2"]), "the query was not answered")
    details = [r["detail"] for r in gws.status("sg1")["transfers"]["recent"]]
    assert "not taken by sg2: kept" in details, details
    assert served_by_one(gws, cap, spi, port) == "sg1"
    assert min(q for s_, q, _, t in list(cap.seen) if s_ == spi and t >= restarted) > before
    assert cap.duplicates() == []


def test_a_leaving_tunnel_whose_peer_is_no_longer_configured_is_shown_held_and_discarded(
    few: Gateways,
) -> None:
    """``sa list`` shows a tunnel mid-transfer as leaving; sg1 is killed then (sg2 frozen,
    then killed: the outcome is unknown) and restarted with sg2 removed from its [[peers]].
    Nobody can be asked: the tunnel is held, never sent on, ``state.unresolved`` says it is
    not asked and how to resolve it, the log says so (``transfer-outcome-unknowable``),
    ``sa list`` shows it UNRESOLVED (text and JSON). ``ipsecct sa discard SPI`` gives it up:
    recorded away, out of the engine, kept away after another restart, never sent on."""
    from tests.helpers.deployment import cli

    gws = few
    cap: Capture = gws.capture  # type: ignore[attr-defined]
    conf = gws.config("sg1")
    log = gws.dir / "sg1.log"
    wait_for(lambda: len(cap.seen) > 100, "no traffic")
    spi = 0x20000000 + 4

    def sa_state(name: str = "sg1") -> tuple[str, str] | None:
        # what `ipsecct sa list --json` prints (its text is read below)
        for s_ in ask(socket_of(gws.config(name)), "sa.list"):
            if int(s_["spi"], 16) == spi:
                return s_["state"], s_["state_detail"]
        return None

    # A transfer that outlives the polling below on a loaded machine: with the fixture's 2 s
    # it was rolled back (installed again) between two reads at load 8 (each read a CLI
    # process of its own then), and sg1 then restarted with nothing unresolved.
    gws.kill("sg1")
    gws.write("sg1", peers=["sg2"], max_transfer_ms=60000)
    gws.start("sg1")
    wait_for(lambda: sa_state() == ("installed", ""), "t4 not installed after the restart")
    freeze(gws, "sg2", True)
    th = start_transfer(gws, spi)
    seen: list[tuple[str, str]] = []

    def leaving() -> bool:
        st = sa_state()
        if st is not None and st[0] == "leaving":
            seen.append(st)
        return bool(seen)

    wait_for(leaving, "not shown leaving")
    assert "to sg2" in seen[0][1], seen
    # `sa list` shows the tunnel leaving from the transfer's start, before its "leaving" row
    # is durable (submitted to the writer thread): killed before it lands, sg1 restarts with
    # the tunnel owned and nothing unresolved (correct, but not this test's case). Killed
    # once the row is on disk (read as test_a_query_after_the_target_pruned... reads it).
    import sqlite3

    def durable_leaving() -> bool:
        db = sqlite3.connect(gws.dir / "state-sg1" / "state.db", isolation_level=None, timeout=5)
        try:
            row = db.execute("SELECT owner FROM sa WHERE spi = ?", (spi,)).fetchone()
        finally:
            db.close()
        return row is not None and row[0] == "leaving"

    wait_for(durable_leaving, "the leaving row is not durable")
    gws.kill("sg1")
    gws.kill("sg2")
    th.join(30)
    gws.write("sg1", peers=["sg3"])  # sg2 is no longer a peer
    cap.sync()
    restarted = time.monotonic()
    offset = log.stat().st_size
    gws.start("sg1")
    (u,) = gws.status("sg1")["state"]["unresolved"]
    assert (int(u["spi"], 16), u["peer"], u["asked"]) == (spi, "sg2", False), u
    assert "sa discard" in u["effect"] and "not among [[peers]]" in u["effect"], u
    text = log.read_text()[offset:]
    assert "event=transfer-outcome-unknowable" in text and "tunnel=t4" in text
    st = sa_state()
    assert st is not None and st[0] == "unresolved" and "nobody asked" in st[1], st
    r = cli("sa", "list", "-c", conf)
    assert r.returncode == 0 and any(
        f"0x{spi:08x}" in ln and "UNRESOLVED" in ln for ln in r.stdout.splitlines()
    ), r.stdout
    r = cli("status", "-c", conf)
    assert "unresolved: t4" in r.stdout and "sa discard" in r.stdout, r.stdout
    r = cli("sa", "discard", "0x20000000", "-c", conf)  # an installed tunnel: refused
    assert r.returncode != 0 and "not unresolved" in r.stderr and "Traceback" not in r.stderr
    r = cli("sa", "discard", "--peer", "sg9", "-c", conf)
    assert r.returncode != 0 and "no unresolved tunnel" in r.stderr, r.stderr
    assert gws.status("sg1")["metrics"]["state_tunnels_unresolved_unasked"] == 1
    time.sleep(0.6)
    # named by its inbound SPI (ours; sa show and sa delete take it too): it took the
    # outbound one only, and said "an SA that is not unresolved"
    r = cli("sa", "discard", hex(0x10000000 + 4), "-c", conf)
    assert r.returncode == 0 and f"discarded 0x{spi:08x}" in r.stdout, (r.stdout, r.stderr)
    st_ = gws.status("sg1")["state"]
    assert st_["unresolved"] == []
    (k,) = [k for k in st_["kept_away"] if int(k["spi"], 16) == spi]
    assert k["owner"] == "away" and "discarded by the operator" in k["detail"], k
    assert sa_state() is None and "event=transfer-discarded" in log.read_text()[offset:]
    gws.kill("sg1")
    gws.start("sg1")
    st_ = gws.status("sg1")["state"]
    assert st_["unresolved"] == [] and spi in {int(k["spi"], 16) for k in st_["kept_away"]}
    time.sleep(0.6)
    cap.sync()
    assert not [q for s_, q, _, t in list(cap.seen) if s_ == spi and t >= restarted]
    assert cap.duplicates() == []


def test_a_target_whose_disk_is_full_never_sends_a_number_twice(gws: Gateways) -> None:
    """sg2's state directory is a small file system, full (one file takes all the room left)
    when sg1 moves every tunnel to it under traffic (already held). The writes of the
    transfer go into the WAL's room reserved at start (``prepare_wal``): they succeed, the
    transfer commits, no tunnel is sent on by both and no (SPI, sequence number) goes out
    twice. (A write that does fail is
    tests/test_state.py's: the target drops the tunnels at the COMMIT.)"""
    import subprocess

    cap: Capture = gws.capture  # type: ignore[attr-defined]
    gws.write("sg1", peers=["sg2"])
    gws.write("sg2", peers=["sg1"], with_tunnels=False)
    state = gws.dir / "state-sg2"
    state.mkdir(mode=0o700)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m,mode=0700", "tmpfs", str(state)], check=True
    )
    traffic = None
    try:
        gws.start("sg2")
        gws.start("sg1")
        traffic = Traffic(
            TUNNELS, [gws.ports["sg1"]["inner"], gws.ports["sg2"]["inner"]], pps=3000
        )
        wait_for(lambda: len(cap.seen) > 500, "no traffic")
        with open(state / "filler", "wb") as f, contextlib.suppress(OSError):  # all room left
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        assert os.statvfs(state).f_bavail == 0
        rec = request(str(gws.dir / "sg1.sock"), "rebalance", {"to": "sg2", "count": TUNNELS}, 60)
        wait_for(lambda: settled(gws, ["sg1", "sg2"]), "transfers did not settle")
        assert gws.procs["sg2"].poll() is None, gws.log("sg2")
        assert rec["outcome"] == "committed", rec
        _, two = one_sender_each(gws, cap)  # sg2 sends on them, its disk full
        assert len(two) == TUNNELS
        assert gws.status("sg2")["state"]["reservations"]["failed_writes"] == 0
        assert cap.duplicates() == []
    finally:
        if traffic is not None:
            traffic.close()
        gws.stop()
        subprocess.run(["umount", "-l", str(state)], check=False)



def test_a_standby_takes_over_a_tunnel_its_active_was_transferring_and_asks_the_target(
    tmp_path: Path,
) -> None:
    """Real processes, every ESP datagram off the wire (docs/cluster.md, "a tunnel
    transferred away"). sg1 (active, standby sg2) starts moving a tunnel to sg3, which is
    frozen (SIGSTOP: no CTDR, no COMMIT); sg2 holds the tunnel's replica marked leaving;
    sg1 is killed, sg3 thawed. sg2 takes sg1's tunnels over, that one held: it asks sg3,
    which either holds the transfer installed (the query is its COMMIT: "taken", sg3 serves
    it) or heard the query first ("not taken": sg2 serves it, past the grant, and sg3
    refuses the late contexts). Either way one gateway serves it and nothing is sent twice;
    sg2 serves the others."""
    cap = Capture()
    g = Gateways(tmp_path, cap.port, tunnels=3, block=64)
    fo = "dead_ms = 1500\n"  # a detection time a loaded machine does not reach by starving sg1
    g.write("sg1", peers=["sg2", "sg3"], extra=f'[failover]\nrole = "active"\npeer = "sg2"\n{fo}')
    g.write(
        "sg2", peers=["sg1", "sg3"], with_tunnels=False,
        extra=f'[failover]\nrole = "standby"\npeer = "sg1"\n{fo}',
    )  # fmt: skip
    g.write("sg3", peers=["sg1", "sg2"], with_tunnels=False, pairs={"sg2": "sg1"})
    traffic = None
    try:
        for n in ("sg2", "sg3", "sg1"):
            g.start(n)
        inner = [g.ports[n]["inner"] for n in ("sg1", "sg2", "sg3")]
        traffic = Traffic(3, inner, pps=600)
        port = {n: g.ports[n]["outer"] for n in ("sg1", "sg2", "sg3")}
        wait_for(lambda: g.status("sg2")["failover"].get("replicated_tunnels") == 3,
                 "nothing replicated")  # fmt: skip
        spi = 0x20000000
        freeze(g, "sg3", True)
        th = start_transfer(g, spi, "sg3")
        wait_for(lambda: g.status("sg2")["failover"].get("replicated_leaving") == 1,
                 "the standby never held the tunnel marked leaving")  # fmt: skip
        g.kill("sg1")
        th.join(30)
        freeze(g, "sg3", False)
        wait_for(lambda: g.status("sg2")["failover"]["role"] == "took over", "no take-over")
        wait_for(lambda: settled(g, ["sg2", "sg3"]), "the standby's query was not answered",
                 detail=lambda: g.log("sg2"))  # fmt: skip
        assert "event=failover-leaving-held" in g.log("sg2")
        details = {r["detail"] for r in g.status("sg2")["transfers"]["recent"]}
        assert details & {"taken by sg3", "not taken by sg3: kept"}, details
        cap.sync()
        t0 = time.monotonic()
        time.sleep(0.6)  # about 60 datagrams of each tunnel
        cap.sync()
        ports = senders_since(cap, t0)
        assert len(ports[spi]) == 1 and ports[spi] <= {port["sg2"], port["sg3"]}, ports
        assert all(ports[spi + i] == {port["sg2"]} for i in (1, 2)), ports
        active = {n for n in ("sg2", "sg3") if spi in g.active_spis(n)}
        assert len(active) == 1, active
        assert cap.duplicates() == []
    finally:
        if traffic is not None:
            traffic.close()
        with contextlib.suppress(Exception):
            freeze(g, "sg3", False)
        g.stop()
        cap.close()


@pytest.fixture
def prepared_pair(tmp_path: Path):  # type: ignore[no-untyped-def]
    """``few`` with make-before-break (a prepared transfer needs it)."""
    cap = Capture()
    g = Gateways(tmp_path, cap.port, tunnels=4, block=64)
    g.capture = cap  # type: ignore[attr-defined]
    mbb = "make_before_break = true\nprepare_timeout = 60"
    g.write("sg1", peers=["sg2"], transfer_extra=mbb)
    g.write("sg2", peers=["sg1"], with_tunnels=False, transfer_extra=mbb)
    g.start("sg2")
    g.start("sg1")
    traffic = Traffic(4, [g.ports["sg1"]["inner"], g.ports["sg2"]["inner"]], pps=400)
    yield g
    traffic.close()
    g.stop()
    cap.close()


def test_a_prepared_transfer_with_either_end_killed_at_each_step(prepared_pair: Gateways) -> None:
    """A prepared transfer with real processes, SIGKILL and every ESP datagram off the wire.

    1. sg1 killed once prepared (no COMMIT): restarted, it asks sg2, which answers "not
       taken" for a prepared transfer and discards it; sg1 sends on the tunnel again.
    2. sg2 killed once prepared (after its install): sg1 loses the channel and rolls back,
       sending on; sg2 restarted keeps the tunnel away (its "pending" row).
    3. sg1 killed the moment its log says it committed: restarted, it asks; sg2 serves the
       tunnel if the COMMIT reached it, else it answers "not taken" and sg1 does.

    Every time: nothing sent twice, the tunnel served by exactly one gateway, and the
    operator told (the transfer's record, ``status``)."""
    gws = prepared_pair
    cap: Capture = gws.capture  # type: ignore[attr-defined]
    port = {n: gws.ports[n]["outer"] for n in ("sg1", "sg2")}
    log = gws.dir / "sg1.log"
    sock = str(gws.dir / "sg1.sock")
    wait_for(lambda: len(cap.seen) > 100, "no traffic")

    def prepare(spi: int) -> str:
        rec = request(sock, "transfer", {"spi": hex(spi), "to": "sg2", "prepare": True}, 30)
        assert rec["outcome"] == "prepared", rec
        return str(rec["id"])

    # 1. the source killed while prepared
    spi = 0x20000000
    tid = prepare(spi)
    offset = log.stat().st_size
    gws.kill("sg1")
    cap.sync()
    before = max(q for s_, q, _, _ in list(cap.seen) if s_ == spi)
    restarted = time.monotonic()
    gws.start("sg1")
    wait_for(lambda: settled(gws, ["sg1", "sg2"]), "the query was not answered")
    assert "event=transfer-outcome-unknown" in log.read_bytes()[offset:].decode(errors="replace")
    assert served_by_one(gws, cap, spi, port) == "sg1"
    assert min(q for s_, q, _, t in list(cap.seen) if s_ == spi and t >= restarted) > before
    details = [r["detail"] for r in gws.status("sg1")["transfers"]["recent"]]
    assert "not taken by sg2: kept" in details, details
    wait_for(lambda: not gws.status("sg2")["transfers"]["in_progress"], "sg2 keeps it")
    assert spi not in gws.active_spis("sg2")

    # 2. the target killed while prepared
    spi += 1
    tid = prepare(spi)
    gws.kill("sg2")
    wait_for(lambda: settled(gws, ["sg1"]), "sg1 did not roll back")
    rec = next(r for r in gws.status("sg1")["transfers"]["recent"] if r["id"] == tid)
    assert rec["outcome"] == "peer lost", rec
    gws.start("sg2")
    wait_for(lambda: settled(gws, ["sg1", "sg2"]), "transfers did not settle")
    assert served_by_one(gws, cap, spi, port) == "sg1"
    with pytest.raises(ControlError, match=r"rolled back|no prepared"):
        request(sock, "transfer.commit", {"id": tid}, 10)

    # 3. the source killed the moment it committed
    spi += 1
    tid = prepare(spi)
    offset = log.stat().st_size

    def commit(ident: str = tid) -> None:
        with contextlib.suppress(ControlError, OSError):
            request(sock, "transfer.commit", {"id": ident}, 30)

    th = threading.Thread(target=commit)
    th.start()
    wait_for_line(log, offset, ("event=transfer-committed", "role=source"))
    gws.kill("sg1")
    th.join(30)
    gws.start("sg1")
    wait_for(lambda: settled(gws, ["sg1", "sg2"]), "transfers did not settle")
    # (sg2 if the COMMIT got out before the kill; else sg2 answers "not taken" and
    # discards it, and sg1 resumes past its ceiling: never both, never nobody)
    assert served_by_one(gws, cap, spi, port) in ("sg1", "sg2")
    assert cap.duplicates() == []


def test_a_prepared_transfer_never_committed_times_out_without_a_gap(
    prepared_pair: Gateways,
) -> None:
    """Prepared and never committed (``prepare_timeout`` 2 s, its least): sg1 rolls it back
    by itself (outcome timeout, told in ``status``), sg2 discards what it installed, and
    the tunnel was sent on by sg1 the whole time, never stopping (make-before-break below
    its cap), never by sg2; a commit afterwards is refused."""
    gws = prepared_pair
    cap: Capture = gws.capture  # type: ignore[attr-defined]
    port = {n: gws.ports[n]["outer"] for n in ("sg1", "sg2")}
    gws.write("sg1", peers=["sg2"], transfer_extra="make_before_break = true\n"
              "prepare_timeout = 2")  # fmt: skip
    gws.kill("sg1")
    gws.start("sg1")
    sock = str(gws.dir / "sg1.sock")
    spi = 0x20000000
    wait_for(lambda: any(s_ == spi and t > time.monotonic() - 0.2 for s_, _, _, t in
                         list(cap.seen)), "no traffic")  # fmt: skip
    rec = request(sock, "transfer", {"spi": hex(spi), "to": "sg2", "prepare": True}, 30)
    assert rec["outcome"] == "prepared", rec
    t0 = time.monotonic()

    def outcome() -> str:
        recent = gws.status("sg1")["transfers"]["recent"]
        return next((r["outcome"] for r in recent if r["id"] == rec["id"]), "")

    wait_for(lambda: outcome() == "timeout", "not rolled back", timeout=10)
    wait_for(lambda: not gws.status("sg2")["transfers"]["in_progress"], "sg2 keeps it")
    time.sleep(0.5)
    cap.sync()
    times = sorted(t for s_, _, p, t in list(cap.seen) if s_ == spi and p == port["sg1"]
                   and t >= t0 - 0.2)  # fmt: skip
    assert times and times[-1] > t0 + 1.2  # (rolled back at its start + 2 s - 1 s)
    gap = max(b - a for a, b in itertools.pairwise(times))
    assert gap < 0.5, f"sg1 stopped sending for {gap:.3f} s"
    assert served_by_one(gws, cap, spi, port) == "sg1"
    with pytest.raises(ControlError, match=r"rolled back|no prepared"):
        request(sock, "transfer.commit", {"id": rec["id"]}, 10)
    assert cap.duplicates() == []


def test_a_rebalance_while_a_transfer_is_prepared_moves_other_tunnels(
    prepared_pair: Gateways,
) -> None:
    """``ipsecct rebalance`` took the first active tunnels, the one of a prepared transfer
    among them (active: it sends below its cap until the commit), and failed whole ("being
    transferred: busy") for as long as that transfer waited. It moves others now; the
    prepared one still commits."""
    gws = prepared_pair
    cap: Capture = gws.capture  # type: ignore[attr-defined]
    sock = str(gws.dir / "sg1.sock")
    wait_for(lambda: len(cap.seen) > 100, "no traffic")
    first = min(gws.active_spis("sg1"))
    rec = request(sock, "transfer", {"spi": hex(first), "to": "sg2", "prepare": True}, 30)
    assert rec["outcome"] == "prepared", rec
    moved = request(sock, "rebalance", {"to": "sg2", "count": 1}, 30)
    assert moved["outcome"] == "committed" and moved["accepted"] == 1, moved
    done = request(sock, "transfer.commit", {"id": rec["id"]}, 30)
    assert done["outcome"] == "committed", done
    wait_for(lambda: settled(gws, ["sg1", "sg2"]), "transfers did not settle")
    assert first in gws.active_spis("sg2") and len(gws.active_spis("sg2")) == 2
    assert cap.duplicates() == []
