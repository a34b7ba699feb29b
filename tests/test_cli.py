"""The command line's error contract: one line on stderr and a documented exit status."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ipsecct import cli


def _parser_raising(exc: BaseException) -> argparse.ArgumentParser:
    def handler(args: argparse.Namespace) -> int:
        raise exc

    p = argparse.ArgumentParser(prog="ipsecct")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(handler=handler)
    return p


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (TimeoutError(), "ipsecct: error: timed out\n"),
        (ConnectionResetError(), "ipsecct: error: ConnectionResetError\n"),
        (FileNotFoundError(2, "No such file or directory", "/x"),
         "ipsecct: error: No such file or directory: /x\n"),
    ],
)
def test_an_os_error_without_text_still_says_what_happened(
    exc: OSError, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "build_parser", lambda: _parser_raising(exc))
    assert cli.main([]) == 2
    assert capsys.readouterr().err == message


@pytest.mark.parametrize("value", ["inf", "1e999", "nan", "0", "-1"])
def test_numeric_arguments_are_positive_and_finite(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ipsecct demo --seconds inf`` was taken, and died in an OverflowError traceback."""
    with pytest.raises(SystemExit) as ei:
        cli.main(["demo", "--seconds", value])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "argument --seconds: must be" in err and "Traceback" not in err


def test_ctrl_c_is_one_line_and_130_at_every_stage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while the command modules load (build_parser), while it waits on a daemon, or
    during a request that changes one: one line, status 130 (it was a KeyboardInterrupt
    traceback and status -2 in the first half second, and silence afterwards)."""

    def interrupted() -> argparse.ArgumentParser:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["gateway", "run", "-c", "x.toml"]) == 130
    assert capsys.readouterr().err == "ipsecct: interrupted\n"
    monkeypatch.undo()

    from ipsecct.commands import sa

    def request(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sa, "request", request)
    assert cli.main(["status", "-s", "/nonexistent.sock"]) == 130
    assert capsys.readouterr().err == "ipsecct: interrupted\n"  # nothing was asked to change
    assert cli.main(["pools", "--leases", "-s", "/x"]) == 130
    assert capsys.readouterr().err == "ipsecct: interrupted\n"  # only a listing
    for argv in (
        ["sa", "delete", "0x10", "-s", "/x"],
        ["pmtu", "set", "16", "1280", "-s", "/x"],
        ["pools", "--release", "10.3.0.1", "-s", "/x"],
    ):
        assert cli.main(argv) == 130
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ipsecct: interrupted (if the daemon got")


def test_status_shows_the_ike_counters_and_pools(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The IKE side was in ``status --json`` only: after an IKE_SA_INIT flood or garbage on
    the IKE port, ``ipsecct status`` showed 'drops: none' and nothing else."""
    from ipsecct.commands import sa

    res = {"name": "sg1", "role": "gateway", "uptime_s": 5.0, "outer": "127.0.0.1:4500",
           "sas": 2, "policies": 1,
           "counters": {"out_packets": 0, "out_bytes": 0, "in_packets": 0, "in_bytes": 0,
                        "icmp_sent": 0, "drops": {"no_sa": 0}},
           "ike": {"ike_sas": 1, "half_open": 20,
                   "counters": {"ike-sa-init": 21, "malformed": 13174, "cookie-sent": 0},
                   "pools": [{"name": "rw", "addrs": "10.3.0.1-10.3.0.254", "share": None,
                              "online": 1, "offline": 2, "away": 0}],
                   "replicas_refused": []}}  # fmt: skip
    monkeypatch.setattr(sa, "request", lambda *a, **k: res)
    assert cli.main(["status", "-s", "/x.sock"]) == 0
    out = capsys.readouterr().out
    assert "  ike: 1 IKE SA(s), 20 half-open; ike-sa-init 21, malformed 13174\n" in out
    assert "  pool rw (10.3.0.1-10.3.0.254): 1 online, 2 offline, 0 away\n" in out


def test_status_shows_the_relay_counters_when_one_is_not_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A moved tunnel's MN's ESP relayed to its new gateway (ipsec/relay.py), and dropped
    over a tunnel's rate or the overall cap: in ``status --json`` only, ``ipsecct status``
    showed nothing of it. One line when any is not 0."""
    from ipsecct.commands import sa

    counters = {"out_packets": 0, "out_bytes": 0, "in_packets": 0, "in_bytes": 0,
                "icmp_sent": 0, "drops": {"no_sa": 0}, "relayed": 0, "relay_refused": 0,
                "relay_capped": 0}  # fmt: skip
    res = {"name": "sg1", "role": "gateway", "uptime_s": 5.0, "outer": "127.0.0.1:4500",
           "sas": 2, "policies": 1, "counters": counters}  # fmt: skip
    monkeypatch.setattr(sa, "request", lambda *a, **k: res)
    assert cli.main(["status", "-s", "/x.sock"]) == 0
    assert "relay" not in capsys.readouterr().out
    counters.update(relayed=120, relay_capped=7)
    assert cli.main(["status", "-s", "/x.sock"]) == 0
    assert "  relay: relayed 120, relay_refused 0, relay_capped 7\n" in capsys.readouterr().out


def test_status_shows_peers_and_transfers_as_lines_and_only_counters_that_are_not_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ipsecct status`` printed ``peers`` and ``transfers`` as one JSON line each (some
    forty counters, nearly all 0), and "fewest left None" for a state with no reservation."""
    from ipsecct.commands import sa

    rec = {"id": "897db5a2fe66cfed", "role": "source", "peer": "gw2", "mode": "predictive",
           "outcome": "committed", "tunnels": 1, "accepted": 1, "ms": 20.949, "detail": ""}
    old = {**rec, "id": "0127edaefa3dc74b", "outcome": "peer lost", "accepted": 0,
           "detail": "connection to gw2 lost"}
    res = {"name": "gw1", "role": "gateway", "uptime_s": 5.0, "outer": "10.230.0.2:4500",
           "sas": 2, "policies": 1,
           "counters": {"out_packets": 0, "out_bytes": 0, "in_packets": 0, "in_bytes": 0,
                        "icmp_sent": 0, "drops": {}},
           "peers": [{"name": "gw2", "address": "10.230.0.3:4801", "allow": ["request", "send"],
                      "connected": True},
                     {"name": "gw3", "address": "10.230.0.4:4801", "allow": [],
                      "connected": False}],
           "transfers": {"in_progress": 0, "prepared": ["7af50ddb1623b1a0"],
                         "recent": [{**old, "id": f"{i:016x}"} for i in range(5)] + [old, rec],
                         "refused": 0, "forwarded": 3, "over_limit": 0, "foreign_query": 2},
           "state": {"dir": "/s", "seq_block": 65536,
                     "reservations": {"sas": 0, "waiting": 0, "min_headroom": None,
                                      "failed_writes": 0}}}  # fmt: skip
    monkeypatch.setattr(sa, "request", lambda *a, **k: res)
    assert cli.main(["status", "-s", "/x.sock"]) == 0
    out = capsys.readouterr().out
    assert "{" not in out and "None" not in out, out
    assert ("  peer gw2 10.230.0.3:4801: connected (may: request, send)\n"
            "  peer gw3 10.230.0.4:4801: not connected (may: nothing)\n"
            "  transfers: 0 in progress, prepared: 7af50ddb1623b1a0\n"
            "    0000000000000004 to gw2 (predictive): peer lost, 0/1 tunnel(s) in 20.949 ms"
            " (connection to gw2 lost)\n"
            "    0127edaefa3dc74b to gw2 (predictive): peer lost, 0/1 tunnel(s) in 20.949 ms"
            " (connection to gw2 lost)\n"
            "    897db5a2fe66cfed to gw2 (predictive): committed, 1/1 tunnel(s) in 20.949 ms\n"
            "  transfer counters: forwarded 3, foreign_query 2\n") in out, out
    assert "  state: /s, 0 SA(s) reserved (blocks of 65536, 0 waiting, 0 failed writes)\n" in out


def _parsers(
    p: argparse.ArgumentParser, path: tuple[str, ...] = ("ipsecct",)
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    out = [(path, p)]
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                out += _parsers(sp, (*path, name))
    return out


def test_every_option_and_argument_says_what_it_is_and_help_names_only_real_commands() -> None:
    """``--help`` listed ``spi``, ``mtu``, ``file`` and several ``--json`` with nothing beside
    them, and ``bench failover`` named an ``ipsecct daemon`` there is no such command."""
    import re

    parsers = _parsers(cli.build_parser())
    names = {" ".join(path) for path, _ in parsers}
    for path, p in parsers:
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction,
                              argparse._SubParsersAction)):  # fmt: skip
                continue
            assert a.help, (" ".join(path), a.dest)
        text = p.format_help()
        # a command named in a help text: ``ipsecct X`` always, or a real command's
        # subcommand ("ipsecct and plain-relay", "/run/ipsecct for root" are prose)
        for m in re.finditer(r"(?<![/\w])(`?)ipsecct ([a-z][a-z0-9-]*)(?: ([a-z][a-z0-9-]*))?",
                             text):  # fmt: skip
            quoted, first, second = m.groups()
            assert f"ipsecct {first}" in names or not quoted, (" ".join(path), m.group(0))
            if quoted and second and any(n.startswith(f"ipsecct {first} ") for n in names):
                assert f"ipsecct {first} {second}" in names, (" ".join(path), m.group(0))


def _status_with_failover(failover: dict[str, object]) -> dict[str, object]:
    return {"name": "sg1", "role": "gateway", "uptime_s": 5.0, "outer": "10.230.0.2:4500",
            "sas": 2, "policies": 1,
            "counters": {"out_packets": 0, "out_bytes": 0, "in_packets": 0, "in_bytes": 0,
                         "icmp_sent": 0, "drops": {}},
            "failover": failover}  # fmt: skip


@pytest.mark.parametrize(("failover", "expected"), [
    ({"role": "active", "peer": "sg2", "reformed": 0, "epoch": 3, "standby": "sg2",
      "standby_acknowledged": False, "sending": False,
      "detail": "lease lost 1262 ms ago: sg2 has not acknowledged within the lease",
      "messages": 181, "contexts": 12, "ike_contexts": 0,
      "ike_refused": 0, "unreplicable": 0, "resyncs": 1, "deferred": 0, "touched_overflows": 0,
      "lease": {"state": "lost", "epoch": 3, "remaining_ms": 0, "lease_ms": 449.101,
                "ended_ms_ago": 1262.4, "losses": 1, "acks": 181, "held_packets": 310,
                "fenced_drops": 0}},
     # (it said "standby acknowledged" here: acknowledged once, silent since, not sending)
     "  failover: active, peer sg2, epoch 3, standby not acknowledging (lease lost),"
     " not sending\n"
     "    lease lost 1262 ms ago: sg2 has not acknowledged within the lease\n"
     "  lease: lost, ended 1262.4 ms ago\n"
     "  failover counters: messages 181, contexts 12, resyncs 1, lease losses 1, lease acks 181,"
     " lease held_packets 310\n"),
    ({"role": "standby", "peer": "sg1", "reformed": 1, "epoch": 2, "standby_of": "sg1",
      "joining": False, "joins_sent": 0, "resumed": 0, "looked_again": 2,
      "replicated_tunnels": 12, "replicated_leaving": 0, "replicated_ike_sas": 0,
      "refused_ike_sas": 0, "last_heard_ms_ago": 40,
      "lease": {"state": "granting", "epoch": 2, "granted": 7, "takeover_possible_in_ms": 410,
                "wait_ms": 450.0, "fenced_drops": 0}},
     "  failover: standby, peer sg1, epoch 2, last heard 40 ms ago\n"
     "  lease: granting, take-over possible in 410 ms if sg1 stays silent\n"
     "  failover counters: reformed 1, looked_again 2, replicated_tunnels 12, lease granted 7\n"),
    ({"role": "took over", "peer": "sg1", "reformed": 0, "epoch": 4, "alone": True,
      "resumed": 0, "looked_again": 0, "detail": "runs alone: no standby holds its tunnels",
      "lease": {"state": "taken over", "epoch": 4, "granted": 9,
                "takeover_possible_in_ms": None, "wait_ms": 450.0, "fenced_drops": 0}},
     "  failover: took over, peer sg1, epoch 4, alone\n"
     "    runs alone: no standby holds its tunnels\n"
     "  lease: taken over\n"
     "  failover counters: lease granted 9\n"),
])  # fmt: skip
def test_status_shows_failover_as_lines_and_only_counters_that_are_not_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    failover: dict[str, object], expected: str,
) -> None:
    """``ipsecct status`` printed ``failover`` as one JSON line (some twenty keys, most 0);
    --json keeps the dict as it is."""
    from ipsecct.commands import sa

    res = _status_with_failover(failover)
    monkeypatch.setattr(sa, "request", lambda *a, **k: res)
    assert cli.main(["status", "-s", "/x.sock"]) == 0
    out = capsys.readouterr().out
    assert "{" not in out and "None" not in out and "True" not in out, out
    assert expected in out, out
    assert cli.main(["status", "-s", "/x.sock", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["failover"] == failover


@pytest.mark.parametrize(("lease", "expected"), [
    ({"state": "held", "id": "7", "ttl_s": 2, "fence_ms": 1948.0, "remaining_ms": 1500,
      "ended_ms_ago": None, "losses": 0},
     "  cluster t (etcd), member sg1: lease held, 1500 ms left\n"),
    ({"state": "lost", "id": "7", "ttl_s": 2, "fence_ms": 1948.0, "remaining_ms": 0,
      "ended_ms_ago": 310.5, "losses": 1},
     "  cluster t (etcd), member sg1: lease lost, ended 310.5 ms ago: not sending on its"
     " tunnels (fenced: packets dropped) until etcd renews the lease; once etcd expires it,"
     " the tunnels are removed here\n"
     "    owned tunnels 1, unowned 0, lease losses 1, removed on expiry 0\n"
     "    transfers withdrawn at take-overs 1 (from members whose lease ended before their"
     " COMMIT: the tunnels taken over from replicas)\n"
     '    etcd error: "no etcd member answered"\n'),
])  # fmt: skip
def test_status_shows_the_etcd_lease_and_whether_the_gateway_sends(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    lease: dict[str, object], expected: str,
) -> None:
    """etcd mode: ``ipsecct status`` said nothing of the member's lease (only --json had
    it): a gateway fenced by a lost lease looked like one that sends."""
    from ipsecct.commands import sa

    res = {**_status_with_failover({}), "cluster": {
        "mode": "etcd", "cluster": "t", "member": "sg1", "lease": lease, "owned_tunnels": 1,
        "unowned_tunnels": 0, "removed_on_expiry": 0,
        "transfers_withdrawn": 0 if lease["state"] == "held" else 1,
        "etcd_error": "" if lease["state"] == "held" else "no etcd member answered"}}
    del res["failover"]
    monkeypatch.setattr(sa, "request", lambda *a, **k: res)
    assert cli.main(["status", "-s", "/x.sock"]) == 0
    out = capsys.readouterr().out
    assert expected in out, out
    assert ("not sending" in out) == (lease["state"] == "lost"), out
    assert ("withdrawn" in out) == (lease["state"] == "lost"), out  # (only when not 0)


def test_sa_list_with_no_sas_prints_one_line_and_json_an_empty_list(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway with no SAs (and an IKE port with no IKE SAs): ``sa list`` printed the
    table's header with no rows under it; now one line, and ``--json`` an empty list."""
    from ipsecct.commands import sa

    monkeypatch.setattr(sa, "request", lambda path, cmd, *a, **k: [])
    for argv, out in ((["sa", "list"], "no SAs\n"), (["sa", "list", "--ike"], "no IKE SAs\n")):
        assert cli.main([*argv, "-s", "/x.sock"]) == 0
        assert capsys.readouterr().out == out
        assert cli.main([*argv, "-s", "/x.sock", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == []


def test_sa_delete_ike_asks_for_the_ike_sa_and_prints_one_line_each(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sa delete --ike NAME|SPI`` / ``--ike-id N`` send ``ike.delete`` (a bare SPI still
    ``sa.delete``), one line per IKE SA deleted, saying whether the peer answered; exactly one
    of SPI, --ike and --ike-id, and an --ike-id that is no #N, are usage errors before any
    daemon is asked."""
    from ipsecct.commands import sa

    asked: list[tuple[str, object]] = []
    row = {"name": "rw", "uid": 3, "spi_i": "1d03575dd13944a4", "spi_r": "89c98d1ac0732575",
           "remote": "10.200.0.1:4500", "remote_id": "c", "children": ["0x7986f70e"],
           "delete_sent": True, "answered": True}  # fmt: skip

    def request(path: str, cmd: str, args: object = None, **k: object) -> object:
        asked.append((cmd, args))
        return [row] if cmd == "ike.delete" else ["0x00000010"]

    monkeypatch.setattr(sa, "request", request)
    for argv, want in ((["--ike", "rw"], {"ike": "rw"}), (["--ike-id", "#3"], {"ike_id": 3}),
                       (["--ike-id", "3"], {"ike_id": 3})):  # fmt: skip
        assert cli.main(["sa", "delete", *argv, "-s", "/x.sock"]) == 0
        assert asked.pop() == ("ike.delete", want)
        assert capsys.readouterr().out == (
            "deleted IKE SA rw #3 (1d03575dd13944a4_i 89c98d1ac0732575_r) of 10.200.0.1:4500,"
            " CHILD SAs 0x7986f70e: DELETE sent, answered\n")
    row["answered"] = False
    assert cli.main(["sa", "delete", "--ike", "rw", "--json", "-s", "/x.sock"]) == 0
    assert json.loads(capsys.readouterr().out) == [row]
    assert cli.main(["sa", "delete", "--ike", "rw", "-s", "/x.sock"]) == 0
    assert "not answered yet" in capsys.readouterr().out
    assert cli.main(["sa", "delete", "0x10", "-s", "/x.sock"]) == 0
    assert asked.pop() == ("sa.delete", {"spi": "0x10"})
    capsys.readouterr()
    asked.clear()
    for bad in ([], ["0x10", "--ike", "rw"], ["--ike", "rw", "--ike-id", "1"],
                ["--ike-id", "0"], ["--ike-id", "x"], ["--ike-id", "-1"]):
        with pytest.raises(SystemExit) as ei:
            cli.main(["sa", "delete", *bad, "-s", "/x.sock"])
        assert ei.value.code == 2, bad
        err = capsys.readouterr().err
        assert "Traceback" not in err and "error:" in err, (bad, err)
    assert not asked


@pytest.mark.parametrize("flag", ["--commit", "--cancel"])
@pytest.mark.parametrize("ident", ["", "xyz", "0123456789abcdef0", "-1", "0x", "+ff", "f_f",
                                   " ff", "0x0123456789abcdef0", "0x-1"])
def test_transfer_commit_and_cancel_say_a_bad_id_is_one(
    flag: str, ident: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``transfer --commit ''`` said "say what to move and where: SA --to PEER" (an empty id
    was taken for no --commit at all); a malformed id is named as one before any daemon is
    asked (none runs here)."""
    assert cli.main(["transfer", f"{flag}={ident}", "-s", "/nonexistent.sock"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "transfer id" in err and "Traceback" not in err, err


@pytest.mark.parametrize("flag", ["--commit", "--cancel"])
@pytest.mark.parametrize(("ident", "sent"), [
    ("6f1c0e2a9b3d4c5e", "6f1c0e2a9b3d4c5e"), ("0x6f1c0e2a9b3d4c5e", "6f1c0e2a9b3d4c5e"),
    ("0X6F1C0E2A9B3D4C5E", "6f1c0e2a9b3d4c5e"), ("ff", "00000000000000ff"),
    ("0xff", "00000000000000ff"),
])  # fmt: skip
def test_transfer_commit_and_cancel_take_an_id_with_or_without_0x(
    flag: str, ident: str, sent: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The command line refused ``--commit 0x...``, which the socket took (and an id of 16
    digits after 0x, which neither took): both read ids alike, and the command sends the
    id in the form status prints."""
    from ipsecct.commands import transfer

    asked: list[tuple[str, dict[str, object]]] = []

    def request(path: str, cmd: str, args: dict[str, object], **kw: object) -> dict[str, object]:
        asked.append((cmd, args))
        return {"id": args["id"], "peer": "sg2", "mode": "prepared", "outcome": "committed",
                "tunnels": 1, "accepted": 1, "ms": 1.0}  # fmt: skip

    monkeypatch.setattr(transfer, "request", request)
    assert cli.main(["transfer", flag, ident, "-s", "/x.sock"]) == 0
    assert asked == [("transfer.commit" if flag == "--commit" else "transfer.cancel",
                      {"id": sent})]  # fmt: skip
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("ident", "tid"), [
    ("6f1c0e2a9b3d4c5e", 0x6F1C0E2A9B3D4C5E), ("0x6f1c0e2a9b3d4c5e", 0x6F1C0E2A9B3D4C5E),
    ("ff", 0xFF), ("0Xff", 0xFF),
    ("-1", None), ("+ff", None), ("f_f", None), (" ff", None), ("0x", None), ("", None),
    ("0x0123456789abcdef0", None), (255, None), (None, None), ("0o17", None),
])  # fmt: skip
def test_the_socket_reads_a_transfer_id_as_the_command_line_does(
    ident: object, tid: int | None
) -> None:
    """The control socket's transfer.commit/cancel id (``_transfer_id``) took what int(x, 16)
    takes: ``0x...`` but not 0x and 16 digits, and ``-1``, ``+ff``, ``f_f``."""
    from ipsecct.errors import ControlError
    from ipsecct.gateway.transfer_service import _transfer_id

    if tid is None:
        with pytest.raises(ControlError, match="is not hex digits"):
            _transfer_id({"id": ident})
    else:
        assert _transfer_id({"id": ident}) == tid


@pytest.mark.parametrize("count", ["0", "-3", "x", "1.5"])
def test_rebalance_count_is_a_positive_whole_number_before_any_daemon_is_asked(
    count: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rebalance --count 0`` (or -3) went to the gateway, which answered; --to and --count
    had no help text. A count that is not a whole number > 0 is a usage error at once."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["rebalance", "--to", "sg2", "--count", count, "-s", "/nonexistent.sock"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--count" in err and "Traceback" not in err and "cannot reach" not in err, err


SA_ADD_BAD = {
    "nested arrays": ("[" * 100_000 + "]" * 100_000, "too deeply nested"),
    "nested objects": ('{"a": ' * 50_000 + "1" + "}" * 50_000, "too deeply nested"),
    "a field twice": ('{"spi": "0x1000", "spi": "0x2000"}', "duplicate field 'spi'"),
    "NaN": ('{"age": NaN}', "NaN is not a JSON number"),
}


@pytest.mark.parametrize("what", list(SA_ADD_BAD), ids=list(SA_ADD_BAD))
def test_sa_add_reads_its_file_as_context_encode_does_before_any_daemon_is_asked(
    what: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sa add`` read its file with a plain json.loads: JSON nested past the recursion
    limit was a RecursionError traceback, and a field given twice or NaN went to the daemon
    (the last one winning), where ``context encode`` refuses them. Now the same strict reader."""
    text, says = SA_ADD_BAD[what]
    f = tmp_path / "sa.json"
    f.write_text(text)
    assert cli.main(["sa", "add", str(f), "-s", str(tmp_path / "none.sock")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err, err
    assert "cannot reach" not in err, err


def test_the_readmes_ike_sa_listing_is_what_sa_list_prints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """README's ``sa list`` sample of an IKE SA, printed from the same SA: its algorithms
    read ``AES_GCM_16_128/...`` and ``AES_GCM_16_128/NO_EXT_SEQ`` (charon's log spelling),
    and README said that was where we differed from swanctl, while ``sa list`` prints
    swanctl's own ``AES_GCM_16-128/...`` (Suite.listing). The whole block must match."""
    import re

    from ipsecct.commands.sa import _print_ike
    from ipsecct.ikev2.message import ProtocolId
    from ipsecct.ikev2.proposal import ENCR_AES_GCM_16, PRF_HMAC_SHA2_256, Suite

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    m = re.search(r"```\n(roadwarrior: #1, ESTABLISHED.*?)```", readme, re.S)
    assert m is not None, "README's sa list sample is gone"
    ike_suite = Suite(ProtocolId.IKE, ENCR_AES_GCM_16, 128, prf=PRF_HMAC_SHA2_256, dh=31)
    esp_suite = Suite(ProtocolId.ESP, ENCR_AES_GCM_16, 128)
    child = {"name": "net", "uid": 2, "spi_in": "7986f70e", "spi_out": "3d7691a7",
             "encap": True, "proposal": esp_suite.name(), "algorithms": esp_suite.listing(),
             "installed_s": 2.0, "rekey_in_s": 3497, "expires_in_s": 3958,
             "local_ts": ["10.201.2.1/32"], "remote_ts": ["10.201.1.1/32"]}  # fmt: skip
    ike = {"name": "roadwarrior", "uid": 1, "state": "established", "role": "responder",
           "spi_i": "1d03575dd13944a4", "spi_r": "89c98d1ac0732575",
           "local": "10.200.0.2:4500", "remote": "10.200.0.1:4500", "local_id": "gw.example",
           "remote_id": "client.example", "proposal": ike_suite.name(),
           "algorithms": ike_suite.listing(), "established_s": 2.0, "rekey_in_s": 13767,
           "expires_in_s": None, "reauth_in_s": None, "encap": True,
           "children": [child]}  # fmt: skip
    rows = {(0x7986F70E, "in"): {"bytes": 252, "packets": 3, "state": "installed"},
            (0x3D7691A7, "out"): {"bytes": 252, "packets": 3, "state": "installed"}}  # fmt: skip
    _print_ike([ike], rows)
    assert capsys.readouterr().out == m.group(1)


def test_status_says_a_standby_took_its_tunnels_over_from_the_dead_active(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """sg2, after taking sg1's tunnels over, listed ``233ae83a78785857 to sg1 (failover):
    took over, 1/1 tunnel(s)``: the tunnels came *from* sg1 (the record's role is
    "standby", which was read as a source's)."""
    from ipsecct.commands import sa

    rec = {"id": "233ae83a78785857", "role": "standby", "peer": "sg1", "mode": "failover",
           "outcome": "took over", "tunnels": 1, "accepted": 1, "ms": 500.679, "detail": ""}
    res = {"name": "sg2", "role": "gateway", "uptime_s": 5.0, "outer": "127.0.4.2:34600",
           "sas": 2, "policies": 1,
           "counters": {"out_packets": 0, "out_bytes": 0, "in_packets": 0, "in_bytes": 0,
                        "icmp_sent": 0, "drops": {}},
           "transfers": {"in_progress": 0, "prepared": [], "recent": [rec]}}  # fmt: skip
    monkeypatch.setattr(sa, "request", lambda *a, **k: res)
    assert cli.main(["status", "-s", "/x.sock"]) == 0
    out = capsys.readouterr().out
    assert ("    233ae83a78785857 from sg1 (failover): took over, 1/1 tunnel(s) in 500.679 ms\n"
            in out), out


def test_an_expired_sa_says_which_hard_lifetime_it_reached(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An SA past its hard lifetime showed ``EXPIRED`` with an empty ``state_detail`` and no
    line under the table (README: "the lines under the table say why for each one that is
    not installed"); an inbound one had none at all. Now the limit it reached, in both."""
    import ipaddress

    from ipsecct.commands import sa as sa_cmd
    from ipsecct.gateway.control import sa_summary
    from ipsecct.ipsec.algorithms import EncAlg
    from ipsecct.ipsec.sad import Direction, Lifetime, SecurityAssociation

    a = ipaddress.ip_address
    sa = SecurityAssociation(0xC0FFEE01, Direction.INBOUND, a("198.51.100.10"),
                             a("203.0.113.1"), enc=EncAlg.AES_GCM_16, enc_key=bytes(20),
                             hard=Lifetime(seconds=3600, packets=10), created=0.0,
                             name="mn-17 in")  # fmt: skip
    d = sa_summary(sa, 3725.0)  # as sa add answers for it, before the engine looked
    assert d["state"] == "expired"
    assert sa.expired(3725.0)
    d = sa_summary(sa, 3725.0)
    assert d["state"] == "expired"
    assert d["state_detail"] == "past its hard lifetime (3600 s): sends and receives nothing"
    monkeypatch.setattr(sa_cmd, "request", lambda path, cmd, *a, **k: (
        [d] if cmd == "sa.list" else []))  # fmt: skip
    assert cli.main(["sa", "list", "-s", "/x.sock"]) == 0
    out = capsys.readouterr().out
    assert ("0xc0ffee01 mn-17 in: expired: past its hard lifetime (3600 s): sends and receives"
            " nothing\n" in out), out


def test_transfer_and_rebalance_name_their_target_alike(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``transfer --help`` said ``--to TO`` where ``rebalance --help`` says ``--to PEER``."""
    for cmd in ("transfer", "rebalance"):
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "--to PEER" in out and "--to TO" not in out, out


def test_sa_show_reads_as_text_not_as_python(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sa show`` printed Python's spellings: ``esn: True``, ``udp_encap: [24500, 14500]``,
    ``udp_encap: None`` for raw ESP and an empty ``state_detail:`` line."""
    from ipsecct.commands import sa as sa_cmd

    shown = [{"spi": "0x20000001", "esn": True, "udp_encap": [24500, 14500],
              "state": "installed", "state_detail": ""},
             {"spi": "0x20000002", "esn": False, "udp_encap": None, "state": "held",
              "state_detail": "fail-over fencing"}]  # fmt: skip
    monkeypatch.setattr(sa_cmd, "request", lambda *a, **k: shown)
    assert cli.main(["sa", "show", "0x20000001", "-s", "/x.sock"]) == 0
    out = capsys.readouterr().out
    assert out == ("           spi: 0x20000001\n"
                   "           esn: yes\n"
                   "     udp_encap: 24500, 14500\n"
                   "         state: installed\n"
                   "\n"
                   "           spi: 0x20000002\n"
                   "           esn: no\n"
                   "     udp_encap: none\n"
                   "         state: held\n"
                   "  state_detail: fail-over fencing\n"
                   "\n"), out


def test_an_unknown_option_is_told_with_its_commands_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``ipsecct transfer --spi 0x1 --to sg2`` (docs/architecture.md had it so) answered with
    the top level's usage, ``ipsecct [-h] [--version] [-v] COMMAND ...``, which says nothing
    of transfer's options. Now transfer's usage and its error line, as for any other usage
    error of it; a nested command (sa list) the same."""
    for argv, prog, bad in ((["transfer", "--spi", "0x1", "--to", "sg2"], "ipsecct transfer",
                             "--spi"),
                            (["sa", "list", "--ikes"], "ipsecct sa list", "--ikes")):  # fmt: skip
        with pytest.raises(SystemExit) as ei:
            cli.main(argv)
        assert ei.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"usage: {prog} "), err
        assert err.endswith(f"{prog}: error: unrecognized arguments: {bad}\n"), err
