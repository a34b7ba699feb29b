"""Commands that talk to a running node over its control socket: ``ipsecct status``,
``ipsecct sa list|show|export|add|delete|rekey``, ``ipsecct pools`` and ``ipsecct pmtu set``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..errors import ContextError, ControlError
from ..gateway.control import request
from ..gateway.log import UNICODE_CONTROLS
from ..tools.files import INPUT_LIMIT, read_limited, read_stream_limited


def socket_path(args: argparse.Namespace) -> str:
    from ..gateway import control

    if args.socket:
        return str(args.socket)
    if args.config:
        from ..gateway import config

        return config.control_socket_of(args.config)  # reads [control] only, no key file
    return os.environ.get("IPSECCT_SOCKET") or control.socket_path(None)


def add_target(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which daemon")
    g.add_argument(
        "--socket",
        "-s",
        help="control socket (default $IPSECCT_SOCKET, else ipsecct.sock in /run/ipsecct for"
        " root or $XDG_RUNTIME_DIR/ipsecct, as the daemon)",
    )
    g.add_argument("--config", "-c", help="take the control socket from this configuration")


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> None:
    cells = [[h for _, h in cols]] + [[str(r.get(k, "")) for k, _ in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for c in cells:
        print("  ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)).rstrip())


SA_COLS = [
    ("spi", "SPI"),
    ("direction", "DIR"),
    ("state_upper", "STATE"),
    ("protocol", "PROTO"),
    ("mode", "MODE"),
    ("src", "SRC"),
    ("dst", "DST"),
    ("algorithms", "ALGORITHMS"),
    ("seq_or_top", "SEQ"),
    ("packets", "PACKETS"),
    ("bytes", "BYTES"),
    ("name", "NAME"),
]


def _sa_rows(result: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in result:
        r["seq_or_top"] = r.get("seq", r.get("replay_top", ""))
        r["state_upper"] = str(r.get("state", "installed")).upper()
        r.setdefault("algorithms", r.get("enc", ""))  # (a daemon from before 'algorithms')
    return result


RECENT_SHOWN = 3  # transfer records in the human status (--json: the last 20)


def _print_transfer_status(res: dict[str, Any]) -> None:
    """``peers`` and ``transfers`` as lines an operator reads: one per peer, the transfers
    in progress, prepared and the last few, and only the counters that are not 0 (it was
    the JSON of each, some forty counters on one line, nearly all 0)."""
    for p in res.get("peers") or []:
        state = "connected" if p.get("connected") else "not connected"
        if p.get("channel") == "unanswered":  # open, but nothing came back within its bound
            state = (f"unanswered since {(p.get('unanswered_ms') or 0) / 1000:.1f} s (the "
                     "channel is open, nothing came back)")  # fmt: skip
        allow = ", ".join(p.get("allow") or []) or "nothing"
        why = p.get("last_error") if not p.get("connected") else None
        print(f"  peer {p.get('name')} {p.get('address')}: {state} (may: {allow})"
              + (f": last attempt failed: {_shown(why)}" if why else ""))  # fmt: skip
    t = res.get("transfers")
    if not isinstance(t, dict):
        return
    prepared = ", ".join(t.get("prepared") or []) or "none"
    print(f"  transfers: {t.get('in_progress', 0)} in progress, prepared: {prepared}")
    for r in (t.get("recent") or [])[-RECENT_SHOWN:]:
        # a target received the tunnels, a standby took them over from its dead active
        way = "from" if r.get("role") in ("target", "standby") else "to"
        detail = f" ({r['detail']})" if r.get("detail") else ""
        print(f"    {r.get('id')} {way} {r.get('peer')} ({r.get('mode')}): {r.get('outcome')},"
              f" {r.get('accepted')}/{r.get('tunnels')} tunnel(s) in {r.get('ms')} ms"
              f"{detail}")  # fmt: skip
    skip = {"in_progress", "prepared", "recent"}
    counted = ", ".join(f"{k} {v}" for k, v in t.items()
                        if k not in skip and isinstance(v, int) and v)  # fmt: skip
    if counted:
        print(f"  transfer counters: {counted}")


# not counters: positions, times and sizes (the rest of the ints are counted events)
_FAILOVER_NOT_COUNTED = {"epoch", "last_heard_ms_ago", "remaining_ms", "lease_ms",
                         "ended_ms_ago", "takeover_possible_in_ms", "wait_ms"}  # fmt: skip


def _counted(d: dict[str, Any], prefix: str = "") -> list[str]:
    return [f"{prefix}{k} {v}" for k, v in d.items() if isinstance(v, int)
            and not isinstance(v, bool) and v and k not in _FAILOVER_NOT_COUNTED]  # fmt: skip


def _print_failover_status(f: dict[str, Any]) -> None:
    """``failover`` as lines: the role, peer and epoch, the lease's state, and only the
    counters that are not 0 (it was one JSON line of some twenty keys)."""
    role = f.get("role")
    head = f"  failover: {role}, peer {f.get('peer')}, epoch {f.get('epoch')}"
    lease = f.get("lease")
    if role == "active":
        # acknowledged within the lease now (an active whose lease ran out said
        # "acknowledged" while it sent nothing, the standby silent or gone)
        if (isinstance(lease, dict) and lease.get("state") == "lost" and not lease.get("acks")
                and lease.get("ended_ms_ago") is None and not f.get("standby_acknowledged")):
            # never a lease at all: a standby not running, or not configured as one
            head += (f", standby {f.get('peer')} has never acknowledged (is it running with"
                     f' [failover] role = "standby"?)')  # fmt: skip
        elif isinstance(lease, dict) and lease.get("state") == "lost":
            head += ", standby not acknowledging (lease lost)"
        elif f.get("standby_acknowledged"):
            head += ", standby acknowledged"
        else:
            head += ", standby not acknowledged yet"
        if f.get("sending") is False:
            head += ", not sending"
    elif role == "standby":
        if f.get("joining"):
            head += ", joining"
        heard = f.get("last_heard_ms_ago")
        head += ", never heard" if heard is None else f", last heard {heard} ms ago"
    elif f.get("alone"):
        head += ", alone"
    print(head)
    if f.get("detail"):
        print(f"    {f['detail']}")
    if isinstance(lease, dict):
        line = f"  lease: {lease.get('state')}"
        if lease.get("remaining_ms"):
            line += f", {lease['remaining_ms']} ms left"
        if lease.get("ended_ms_ago") is not None:
            line += f", ended {lease['ended_ms_ago']} ms ago"
        if lease.get("takeover_possible_in_ms") is not None:
            # (it read as a take-over due then: it is the soonest, should the peer go silent)
            line += f", take-over possible in {lease['takeover_possible_in_ms']} ms"
            if f.get("peer"):
                line += f" if {f['peer']} stays silent"
        print(line)
    counted = _counted(f) + (_counted(lease, "lease ") if isinstance(lease, dict) else [])
    if counted:
        print(f"  failover counters: {', '.join(counted)}")


def _print_cluster_status(c: dict[str, Any]) -> None:
    """etcd mode (``cluster``): the member's lease, whether it sends, and why not."""
    lease = c.get("lease")
    if not isinstance(lease, dict):
        return
    state = lease.get("state")
    line = f"  cluster {c.get('cluster')} (etcd), member {c.get('member')}: lease {state}"
    if c.get("joined") is False and state != "held":  # (no lease to have lost)
        line = (f"  cluster {c.get('cluster')} (etcd), member {c.get('member')}: not joined:"
                " etcd has not granted it a lease yet; sends nothing until it has")
    elif state == "held":
        line += f", {lease.get('remaining_ms')} ms left"
    else:
        if lease.get("ended_ms_ago") is not None:
            line += f", ended {lease['ended_ms_ago']} ms ago"
        line += (": not sending on its tunnels (fenced: packets dropped) until etcd renews"
                 " the lease; once etcd expires it, the tunnels are removed here")  # fmt: skip
    print(line)
    print(f"    owned tunnels {c.get('owned_tunnels')}, unowned {c.get('unowned_tunnels')},"
          f" lease losses {lease.get('losses')},"
          f" removed on expiry {c.get('removed_on_expiry')}")  # fmt: skip
    if c.get("last_life_end"):  # (why its last lease ended: etcd, or its member key lost)
        ends = c.get("lives_ended") or {}
        print(f"    lives ended {sum(ends.values()) if isinstance(ends, dict) else ends}:"
              f" last: {_shown(c['last_life_end'])}")  # fmt: skip
    if c.get("transfers_withdrawn"):
        print(f"    transfers withdrawn at take-overs {c['transfers_withdrawn']} (from members"
              " whose lease ended before their COMMIT: the tunnels taken over from replicas)")
    if c.get("etcd_error"):  # (what etcd or the network said: quoted, escaped)
        print(f"    etcd error: {_shown(c['etcd_error'])}")


def cmd_status(args: argparse.Namespace) -> int:
    res = request(socket_path(args), "status")
    if args.json:
        _print_json(res)
        return 0
    c = res["counters"]
    print(f"{res['name']} ({res['role']}), up {res['uptime_s']:.0f} s, outer {res['outer']}")
    print(f"  SAs {res['sas']}, policies {res['policies']}")
    print(
        f"  out {c['out_packets']} packets / {c['out_bytes']} bytes,"
        f" in {c['in_packets']} packets / {c['in_bytes']} bytes, ICMP sent {c['icmp_sent']}"
    )
    drops = ", ".join(f"{k} {v}" for k, v in c["drops"].items() if v) or "none"
    print(f"  drops: {drops}")
    relay = [(k, c.get(k, 0)) for k in ("relayed", "relay_refused", "relay_capped")]
    if any(v for _, v in relay):  # a moved tunnel's MN's ESP sent on (ipsec/relay.py)
        print("  relay: " + ", ".join(f"{k} {v}" for k, v in relay))
    conf = res.get("config")
    if isinstance(conf, dict):  # which file runs (a hash of it), and the SIGHUP reloads
        print(f"  config: {conf['file']} (sha256 {str(conf['sha256'])[:16]}), loaded"
              f" {conf['loaded_at']}, {conf['reloads']} reload(s), {conf['reloads_failed']}"
              " refused" + (f", {conf['coalesced']} SIGHUP(s) coalesced"
                            if conf.get("coalesced") else "")
              + (f"; needs a restart: {', '.join(conf['needs_restart'])}"
                 if conf["needs_restart"] else ""))  # fmt: skip
    _print_transfer_status(res)
    if isinstance(res.get("failover"), dict):
        _print_failover_status(res["failover"])
    if isinstance(res.get("cluster"), dict):
        _print_cluster_status(res["cluster"])
    ike = res.get("ike") or {}
    if ike:  # what the IKE port got (counted and dropped, or answered) and the pools
        counted = ", ".join(f"{k} {v}" for k, v in ike.get("counters", {}).items() if v)
        down = ike.get("children_not_established") or 0
        down_text = f", {down} CHILD SA(s) not established (sa list --ike)" if down else ""
        print(f"  ike: {ike.get('ike_sas', 0)} IKE SA(s), {ike.get('half_open', 0)} half-open"
              + down_text + (f"; {counted}" if counted else ""))  # fmt: skip
    for p in ike.get("pools") or []:
        share = f", share {p['share']}" if p.get("share") else ""
        print(f"  pool {p['name']} ({p['addrs']}{share}): {p['online']} online,"
              f" {p['offline']} offline, {p['away']} away")  # fmt: skip
    # IKE SAs a standby (or cluster member) could not take over: a fail-over would lose them
    for r in ike.get("replicas_refused") or []:
        print(f"  IKE SA {r['spi_i']}_i {r['spi_r']}_r ({r['conn']}, {r['id']}): "
              f"{r['standby']} refused its replica: {r['reason']}")  # fmt: skip
    st = res.get("state")
    if isinstance(st, dict):
        r = st["reservations"]
        fewest = "" if r["min_headroom"] is None else f" fewest left {r['min_headroom']},"
        print(
            f"  state: {st['dir']}, {r['sas']} SA(s) reserved (blocks of {st['seq_block']},"
            f"{fewest} {r['waiting']} waiting, {r['failed_writes']} failed writes)"
        )
        for what in ("kept_away", "refused", "not_restored"):
            items = st.get(what) or []
            if items:
                names = ", ".join(i["name"] for i in items[:10])
                more = f" and {len(items) - 10} more" if len(items) > 10 else ""
                print(f"  {what.replace('_', ' ')}: {len(items)} tunnel(s): {names}{more}")
        for u in st.get("unresolved") or []:
            print(f"  unresolved: {u['name']} ({u['spi']}), transfer {u['transfer']} to"
                  f" {u['peer'] or '?'}: {u['effect']}")  # fmt: skip
    return 0


def _ike_sas(path: str) -> list[dict[str, Any]] | None:
    """The node's IKE SAs, or None when it runs no IKE."""
    try:
        res: list[dict[str, Any]] = request(path, "ike.list")
    except ControlError as exc:
        if "unknown command" in str(exc) or "runs no IKEv2" in str(exc):
            return None
        raise
    return res


def _due(sa: dict[str, Any]) -> str:
    """", rekeying in 3402 s, expires in 3958 s" as far as the SA has those deadlines (and an
    IKE SA's "reauth in", as swanctl --list-sas)."""
    out = ""
    if sa.get("rekey_in_s") is not None:
        out += f", rekeying in {sa['rekey_in_s']} s"
    if sa.get("reauth_in_s") is not None:
        out += f", reauth in {sa['reauth_in_s']} s"
    if sa.get("expires_in_s") is not None:
        out += f", expires in {sa['expires_in_s']} s"
    return out


def _print_ike(
    sas: list[dict[str, Any]], rows: dict[tuple[int, str], dict[str, Any]] | None = None
) -> None:
    """Like ``swanctl --list-sas``: each IKE SA, then its CHILD SAs indented, each with the
    state of its outbound SA, INSTALLED when it is simply so, and as swanctl a line per
    direction with its SPI, bytes and packets (``rows``: sa.list's rows by SPI and
    direction; without them, neither)."""
    rows = rows or {}
    for ike in sas:
        print(f"{ike['name']}: #{ike['uid']}, {ike['state'].upper()}, IKEv2, "
              f"{ike['spi_i']}_i {ike['spi_r']}_r ({ike['role']})")  # fmt: skip
        # virtual IPs in brackets after the address, as swanctl --list-sas has them
        lv = "".join(f" [{v}]" for v in ike.get("local_vips", []))
        rv = "".join(f" [{v}]" for v in ike.get("remote_vips", []))
        lid = f" id {ike['local_id']}" if ike.get("local_id") else ""
        # ESP and IKE in UDP (NAT-T, port 4500): swanctl's TUNNEL-in-UDP, per IKE SA here too
        encap = " (NAT-T: UDP-encapsulated)" if ike.get("encap") else ""
        print(f"  local  {ike['local']}{lid}{lv}")
        print(f"  remote {ike['remote']} id {ike['remote_id']!s}{rv}{encap}")
        # a half-open IKE SA is not established: its age is since IKE_SA_INIT
        since = "established" if ike["state"] != "half-open" else "IKE_SA_INIT"
        algs = ike.get("algorithms", ike["proposal"])  # (a daemon from before 'algorithms')
        print(f"  {algs}, {since} {ike['established_s']} s ago{_due(ike)}")
        for c in ike["children"]:
            sa = rows.get((int(str(c["spi_out"]), 16), "out")) or {}
            state = str(sa.get("state", "installed")).upper()
            mode = "TUNNEL-in-UDP" if c.get("encap") else "TUNNEL"
            # 0x, as in the SA table: the SPI is copied into sa show / transfer, which read
            # digits alone as decimal (swanctl's "20000001_i" would name 0x01312d01)
            print(f"  {c['name']}: #{c['uid']}, {state}, {mode}, ESP in 0x{c['spi_in']}, "
                  f"out 0x{c['spi_out']}, {c.get('algorithms', c['proposal'])}")  # fmt: skip
            print(f"    installed {c['installed_s']} s ago{_due(c)}")
            for d in ("in", "out"):  # (swanctl: "in  c7986f70,    252 bytes,     3 packets")
                r = rows.get((int(str(c[f"spi_{d}"]), 16), d))
                if r is not None:
                    print(f"    {d:<3} 0x{c[f'spi_{d}']}, {r.get('bytes', 0):>6} bytes, "
                          f"{r.get('packets', 0):>5} packets")  # fmt: skip
            if sa.get("state_detail"):
                print(f"    {sa['state_detail']}")
            print(f"    local  {' '.join(c['local_ts'])}")
            print(f"    remote {' '.join(c['remote_ts'])}")
        for c in ike.get("children_not_established") or []:
            retry = c.get("retry_in_s")
            print(f"  {c['name']}: NOT ESTABLISHED, {c['reason']}"
                  + (f", retrying in {retry} s" if retry is not None else ""))  # fmt: skip


def _by_spi(res: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, Any]]:
    return {(int(r["spi"], 16), str(r.get("direction"))): r for r in res}


def cmd_sa_list(args: argparse.Namespace) -> int:
    path = socket_path(args)
    if args.ike:
        ike = _ike_sas(path)
        if ike is None:
            raise ControlError("this node runs no IKEv2 (no [connections] configured)")
        if args.json:
            _print_json(ike)
        elif not ike:
            print("no IKE SAs")
        else:
            _print_ike(ike, _by_spi(request(path, "sa.list")))
        return 0
    res = request(path, "sa.list")
    if args.json:
        _print_json(res)  # none: [] (an empty list, as --ike)
        return 0
    ike = _ike_sas(path)
    if ike:
        _print_ike(ike, _by_spi(res))
        print()
    if not res:  # one line, not a table header with no rows under it
        print("no SAs")
        return 0
    _table(_sa_rows(res), SA_COLS)
    # what is not simply installed, and why (held SAs send nothing); a tunnel's state once
    # (its outbound SA's), an SA's own expiry for each
    for r in res:
        if r.get("state_detail") and (r.get("direction") == "out"
                                      or r.get("state") == "expired"):  # fmt: skip
            print(f"{r['spi']} {r.get('name', '')}: {r['state']}: {r['state_detail']}")
    return 0


def cmd_sa_show(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"spi": args.spi}
    if args.dst is not None:
        params["dst"] = args.dst
    if args.proto is not None:
        params["proto"] = args.proto
    res = request(socket_path(args), "sa.show", params)
    if args.json:
        _print_json(res)
        return 0
    for sa in res:
        for k, v in sa.items():
            if v == "" and k == "state_detail":
                continue  # (installed: nothing to say)
            print(f"{k:>14}: {_as_text(v)}")
        print()
    return 0


def _as_text(v: Any) -> str:
    """A value of sa show as text (it printed Python's True, [24500, 14500] and None)."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v is None:
        return "none"
    if isinstance(v, list):
        return ", ".join(_as_text(x) for x in v)
    return str(v)


def cmd_sa_export(args: argparse.Namespace) -> int:
    if not args.wireshark:
        raise ControlError("say which format: --wireshark")
    res = request(socket_path(args), "sa.export")
    if args.json:
        _print_json(res)
    else:
        for line in res:
            print(line)
    return 0


def cmd_sa_add(args: argparse.Namespace) -> int:
    try:
        if args.file == "-":
            raw = read_stream_limited(sys.stdin.buffer, INPUT_LIMIT)
        else:
            raw = read_limited(args.file, INPUT_LIMIT)
        text = raw.decode()
    except UnicodeDecodeError:
        raise ControlError(f"{args.file}: not UTF-8 text") from None
    except OSError as exc:
        raise ControlError(f"cannot read {args.file}: {exc.strerror}") from None
    from .context import parse_json  # context encode's strict reader: one error for a file

    try:
        obj = parse_json(text)
    except ContextError as exc:
        raise ControlError(f"{args.file}: {exc}") from None
    items = obj if isinstance(obj, list) else [obj]
    if not items:
        raise ControlError(f"{args.file}: an empty list: no SA to add")
    out: list[Any] = []
    refused = ""
    for i, it in enumerate(items):
        try:
            out.append(request(socket_path(args), "sa.add", {"context": it}))
        except ControlError as exc:
            if not out:  # nothing done: the one error, status 2
                raise
            # The ones before it are installed: show them, and say this one was not.
            refused = f"SA {i + 1} of {len(items)}: {exc} ({len(out)} added before it, listed)"
            break
    if args.json:
        _print_json(out)
    else:
        _table(_sa_rows(out), SA_COLS)
    from ..cli import _one_line  # (a daemon's text as every error: one line)

    for added in out:  # added, but e.g. to an address that is not the gateway's: said
        if isinstance(added, dict) and isinstance(added.get("warning"), str):
            print(_one_line(f"ipsecct: warning: {added['warning']}"), file=sys.stderr)
    if refused:
        print(_one_line(f"ipsecct: error: {refused}"), file=sys.stderr)
        return 1
    return 0


def _ike_deleted(r: dict[str, Any]) -> str:
    """One line for an IKE SA ``sa delete --ike`` deleted (what swanctl --terminate logs)."""
    kids = " ".join(r.get("children") or []) or "none"
    if not r.get("delete_sent"):
        how = "dropped (not established: nobody to tell)"
    elif r.get("answered"):
        how = "DELETE sent, answered"
    else:
        how = "DELETE sent, not answered yet (sent again until it is, then given up)"
    return (f"deleted IKE SA {r.get('name')} #{r.get('uid')} ({r.get('spi_i')}_i"
            f" {r.get('spi_r')}_r) of {r.get('remote')}, CHILD SAs {kids}: {how}")


def cmd_sa_delete(args: argparse.Namespace) -> int:
    if args.spi is None and (args.dst is not None or args.proto is not None):
        raise ControlError("--dst and --proto name the SA of an SPI: sa delete SPI --dst ADDR")
    if args.ike is not None or args.ike_id is not None:
        params: dict[str, Any] = (
            {"ike": args.ike} if args.ike is not None else {"ike_id": args.ike_id})
        rows = request(socket_path(args), "ike.delete", params)
        if args.json:
            _print_json(rows)
        else:
            for r in rows:
                print(_ike_deleted(r))
        return 0
    params = {"spi": args.spi}
    if args.dst is not None:
        params["dst"] = args.dst
    if args.proto is not None:
        params["proto"] = args.proto
    res = request(socket_path(args), "sa.delete", params)
    if args.json:
        _print_json(res)
    else:
        print("deleted " + " ".join(res))
    return 0


def cmd_sa_rekey(args: argparse.Namespace) -> int:
    params: dict[str, Any] = (
        {"spi": args.spi} if args.spi is not None
        else {"ike": args.ike} if args.ike is not None else {"ike_id": args.ike_id})
    rows = request(socket_path(args), "ike.rekey", params)
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            what = (f"CHILD SA {r.get('child')}" if r.get("child")
                    else f"IKE SA {r.get('name')} #{r.get('uid')} ({r.get('spi_i')}_i"
                    f" {r.get('spi_r')}_r)")  # fmt: skip
            print(f"rekeying {what}: CREATE_CHILD_SA sent (see sa list --ike for the new SA)")
    return 0


def cmd_sa_discard(args: argparse.Namespace) -> int:
    if args.spi is None and (args.dst is not None or args.proto is not None):
        raise ControlError("--dst and --proto name the SA of an SPI: sa discard SPI --dst ADDR")
    params: dict[str, Any] = {"peer": args.peer} if args.peer is not None else {"spi": args.spi}
    if args.dst is not None:
        params["dst"] = args.dst
    if args.proto is not None:
        params["proto"] = args.proto
    res = request(socket_path(args), "sa.discard", params)
    if args.json:
        _print_json(res)
    else:
        print("discarded " + " ".join(res))
    return 0


_SHOWN = {c: f"\\u{c:04x}" for c in UNICODE_CONTROLS}


def _shown(identity: object) -> str:
    """An identity (a peer's text, or a hand-edited lease's) quoted, with its control
    characters escaped: C0 by JSON, C1, separators and bidi overrides here."""
    return json.dumps(str(identity), ensure_ascii=False).translate(_SHOWN)


def _lease_limit(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to 65536")
    return n


def cmd_pools(args: argparse.Namespace) -> int:
    """Like ``swanctl --list-pools [--leases]``: each pool, then each of its leases."""
    if args.release is not None:
        got = request(socket_path(args), "pools.release", {"address": args.release})
        if args.json:
            _print_json(got)
        else:
            print(f"{got['address']} of pool {got['pool']} is offline again"
                  f" (for {_shown(got['identity'])})")  # fmt: skip
        return 0
    query: dict[str, object] = {"leases": bool(args.leases)}
    if args.limit is not None:  # (else the gateway's default: a gateway before --limit)
        query["limit"] = args.limit
    res = request(socket_path(args), "pools.list", query)
    if args.json:
        _print_json(res)
        return 0
    if not res:
        print("no pools configured")
    for p in res:
        share = f", share {p['share']}" if p.get("share") else ""
        print(f"{p['name']} ({p['addrs']}{share}): {p['online']} online,"
              f" {p['offline']} offline, {p['away']} away")  # fmt: skip
        rows = p.get("leases") or []
        width = max((len(str(r["address"])) for r in rows), default=0)
        for r in rows:  # the identity is the peer's text: quoted, control characters escaped
            who = _shown(r["identity"])
            print(f"  {str(r['address']).ljust(width)}  {str(r['state']).ljust(7)}  {who}")
        if p.get("leases_left_off"):
            print(f"  ... and {p['leases_left_off']} more not listed (--limit)")
    return 0


def cmd_pmtu_set(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"spi": args.spi, "mtu": args.mtu}
    if args.dst is not None:
        params["dst"] = args.dst
    if args.proto is not None:
        params["proto"] = args.proto
    res = request(socket_path(args), "pmtu.set", params)
    if args.json:
        _print_json(res)
    else:
        print(f"path MTU of {res['changed']} SA(s) set to {args.mtu}")
    return 0


def _spi(text: str) -> str:
    """An SPI argument, checked as the daemon reads it (control.parse_spi) and sent as
    text: -1 was looked up as "0x-0000001"."""
    from ..gateway.control import parse_spi

    try:
        parse_spi(text)
    except ControlError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


SPI_HELP = "decimal, 0x hex, or as swanctl prints it (c0ffee01_i)"
DST_HELP = ("the SA's destination, when its SPI names more than one SA (a peer chooses our"
            " outbound SAs' SPIs, and may choose another's)")
PROTO_HELP = "the SA's protocol, when an ESP and an AH SA have its SPI (and destination)"


def add_dst_proto(p: argparse.ArgumentParser) -> None:
    """``--dst ADDR`` and ``--proto esp|ah``: which SA of an SPI (the SAD's own key)."""
    p.add_argument("--dst", type=_address, metavar="ADDR", help=DST_HELP)
    p.add_argument("--proto", choices=["esp", "ah"], help=PROTO_HELP)


def _address(text: str) -> str:
    """``--dst``: an IPv4 or IPv6 address, checked here, sent as text."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _ike_id(text: str) -> int:
    """``--ike-id``: the #N of ``sa list --ike`` (a leading # is allowed)."""
    try:
        n = int(text.removeprefix("#"))
    except ValueError:
        n = 0
    if not 1 <= n < 1 << 63:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IKE SA's number (#N of sa list"
                                         " --ike)")  # fmt: skip
    return n


def register(sub: Any) -> None:
    def leaf(parent: Any, name: str, helptext: str, fn: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=helptext, description=helptext)
        add_target(p)
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(handler=fn)
        return p

    leaf(sub, "status", "a running node's SAs, counters, drops and uptime; its peers, transfers,"
         " fail-over, IKE SAs, pools and durable state", cmd_status)  # fmt: skip
    sa = sub.add_parser("sa", help="list, show, export, add, delete or discard SAs of a running"
                        " node")  # fmt: skip
    ss = sa.add_subparsers(dest="action", metavar="ACTION")
    ss.required = True
    lst = leaf(ss, "list", "list IKE SAs with their CHILD SAs, and all SAs (never keys)",
               cmd_sa_list)  # fmt: skip
    lst.add_argument("--ike", action="store_true", help="only the IKE SAs (IKEv2)")
    sh = leaf(ss, "show", "one SA in detail", cmd_sa_show)
    sh.usage = "%(prog)s [options] SPI [--dst ADDR] [--proto esp|ah]"  # (one line)
    sh.add_argument("spi", type=_spi, help=SPI_HELP)
    add_dst_proto(sh)
    e = leaf(ss, "export", "print keys for tshark / ipsecct pcap decrypt", cmd_sa_export)
    e.add_argument("--wireshark", action="store_true", help="Wireshark esp_sa lines")
    leaf(
        ss, "add", "add SAs from a feature-context JSON file (- for stdin)", cmd_sa_add
    ).add_argument("file", metavar="FILE|-", help="a context or a list of them, or - for stdin")
    de = leaf(
        ss, "delete",
        "delete the SAs with this SPI (an IKE-keyed CHILD SA: its DELETE goes to the peer, as"
        " swanctl --terminate --child), or an IKE SA with its CHILD SAs (--ike, --ike-id: as"
        " swanctl --terminate --ike)",
        cmd_sa_delete,
    )  # fmt: skip
    # (argparse's own usage, with --ike and --ike-id, wraps to three lines: a usage error
    # is one line of usage and one of error)
    de.usage = ("%(prog)s [options] (SPI [--dst ADDR] [--proto esp|ah] | --ike NAME|SPI"
                " | --ike-id N)")  # fmt: skip
    g = de.add_mutually_exclusive_group(required=True)
    g.add_argument("spi", nargs="?", type=_spi, help=SPI_HELP)
    add_dst_proto(de)
    g.add_argument("--ike", metavar="NAME|SPI",
                   help="the IKE SAs of this connection, or the IKE SA of this IKE SPI (16 hex"
                   " digits, as sa list --ike prints them) or CHILD SA SPI: a DELETE to the"
                   " peer, its CHILD SAs removed here at once")  # fmt: skip
    g.add_argument("--ike-id", type=_ike_id, metavar="N",
                   help="the IKE SA #N of sa list --ike (swanctl's unique id)")
    rk = leaf(
        ss, "rekey",
        "rekey a CHILD SA named by its SPI (as swanctl --rekey --child), or an IKE SA (--ike,"
        " --ike-id: as swanctl --rekey --ike): the CREATE_CHILD_SA request goes now",
        cmd_sa_rekey,
    )  # fmt: skip
    rk.usage = "%(prog)s [options] (SPI | --ike NAME|SPI | --ike-id N)"
    g = rk.add_mutually_exclusive_group(required=True)
    g.add_argument("spi", nargs="?", type=_spi, help=SPI_HELP + " (either direction)")
    g.add_argument("--ike", metavar="NAME|SPI",
                   help="the IKE SAs of this connection, or the IKE SA of this IKE SPI (16 hex"
                   " digits) or CHILD SA SPI")  # fmt: skip
    g.add_argument("--ike-id", type=_ike_id, metavar="N",
                   help="the IKE SA #N of sa list --ike (swanctl's unique id)")
    d = leaf(
        ss, "discard",
        "give up tunnels held because their transfer's outcome is unknown (state.unresolved):"
        " never sent on here again",
        cmd_sa_discard,
    )  # fmt: skip
    d.usage = "%(prog)s [options] (SPI [--dst ADDR] [--proto esp|ah] | --peer NAME)"
    g = d.add_mutually_exclusive_group(required=True)
    g.add_argument("spi", nargs="?", type=_spi,
                   help="an SPI of the tunnel, inbound or outbound (" + SPI_HELP + ")")
    g.add_argument("--peer", help="every unresolved tunnel that was going to this peer")
    add_dst_proto(d)
    pools = leaf(sub, "pools", "a running gateway's virtual IP pools", cmd_pools)
    g = pools.add_mutually_exclusive_group()
    g.add_argument("--leases", action="store_true",
                   help="each lease: address, online/offline/away, identity")  # fmt: skip
    g.add_argument("--release", metavar="ADDR",
                   help="an away address (its IKE SA went to another gateway) leased here"
                   " again: only once that IKE SA has ended there")  # fmt: skip
    pools.add_argument("--limit", type=_lease_limit, metavar="N",
                       help="with --leases: list at most N leases, all pools together"
                       " (default 1000, at most 65536); the rest are counted")  # fmt: skip
    pm = sub.add_parser("pmtu", help="path MTU of a running node's SAs")
    ps = pm.add_subparsers(dest="action", metavar="ACTION")
    ps.required = True
    p = leaf(ps, "set", "change an SA's path MTU at run time", cmd_pmtu_set)
    p.usage = "%(prog)s [options] SPI MTU [--dst ADDR] [--proto esp|ah]"  # (one line)
    p.add_argument("spi", type=_spi, help=SPI_HELP)
    p.add_argument("mtu", type=int, help="the path MTU in octets")
    add_dst_proto(p)

