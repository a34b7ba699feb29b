"""Two IKEv2 engines talking to each other in memory (an initiator, the MN, and a responder,
the gateway): connections for them and the wire between them."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import TypeVar

from ipsecct.ikev2 import message as M
from ipsecct.ikev2.config import ChildConfig, Connection, Identity
from ipsecct.ikev2.engine import IkeEngine, Output, Send
from ipsecct.ikev2.ikesa import Address, IkeSA
from ipsecct.ikev2.pool import Pool, parse_range
from ipsecct.ikev2.proposal import parse_list
from ipsecct.ikev2.ts import from_text

E = TypeVar("E")  # an output's class, for Wire.of

IP_I = ipaddress.ip_address("192.0.2.10")
IP_R = ipaddress.ip_address("192.0.2.1")
I500, R500 = Address(IP_I, 500), Address(IP_R, 500)
PSK = b"a pre-shared key for the tests"


def conn(name: str = "c", *, ike: str = "aes128gcm16-prfsha256-x25519",
         esp: str = "aes128gcm16", local_ts: str = "10.1.0.0/16", remote_ts: str = "10.2.0.0/16",
         local_id: str = "gw.test", remote_id: str = "%any", psk: bytes = PSK,
         encap: bool = False, dpd: float = 0.0, rekey: float | None = None,
         child_rekey: float | None = None, remote_auth: str = "psk") -> Connection:  # fmt: skip
    child = ChildConfig("net", [from_text(local_ts)], [from_text(remote_ts)],
                        parse_list([esp], M.ProtocolId.ESP), child_rekey)  # fmt: skip
    return Connection(name, [], [], parse_list([ike], M.ProtocolId.IKE), "psk",
                      Identity(local_id), remote_auth, Identity(remote_id), psk, encap, dpd,
                      rekey, [child])  # fmt: skip


def mn_conn(**kw: object) -> Connection:
    kw.setdefault("local_ts", "10.2.0.5/32")
    kw.setdefault("remote_ts", "10.1.0.0/16")
    kw.setdefault("local_id", "mn.test")
    kw.setdefault("remote_id", "gw.test")
    return conn("mn", **kw)  # type: ignore[arg-type]


class Wire:
    """Carries the datagrams between an initiator and a responder engine."""

    def __init__(self, ini: IkeEngine, resp: IkeEngine) -> None:
        self.ini, self.resp = ini, resp
        self.events: dict[str, list[Output]] = {"i": [], "r": []}
        self.sent: list[Send] = []
        self.nat: Address | None = None  # the initiator's address as the responder sees it
        self.behind = IP_I  # the initiator's own address behind that NAT (its last source)

    def deliver(self, outs: list[Output], frm: str, now: float = 0.0, *,
                drop: bool = False) -> None:  # fmt: skip
        pending = [(frm, o) for o in outs]
        while pending:
            side, o = pending.pop(0)
            if not isinstance(o, Send):
                self.events[side].append(o)
                continue
            self.sent.append(o)
            if drop:
                continue
            src, dst = o.src, o.dst
            if side == "i" and self.nat is not None:
                self.behind = o.src.host
                src = Address(self.nat.host, self.nat.port + (o.src.port != 500))
            if side == "r" and self.nat is not None:
                dst = Address(self.behind, 500 if o.dst.port == self.nat.port else 4500)
            target, other = (self.resp, "r") if side == "i" else (self.ini, "i")
            pending += [(other, x) for x in target.receive(o.data, src, dst, now)]

    def of(self, side: str, cls: type[E]) -> list[E]:
        return [e for e in self.events[side] if isinstance(e, cls)]


def pair(ic: Connection | None = None, rc: Connection | None = None) -> Wire:
    return Wire(IkeEngine([ic or mn_conn()]), IkeEngine([rc or conn()]))


def connect(w: Wire, now: float = 0.0) -> None:
    w.deliver(w.ini.initiate(w.ini.connections[0], I500, R500, now), "i", now)


def peer_rekeyed_before_the_move() -> tuple[Wire, IkeSA, IkeSA, Send]:
    """The MN rekeys its CHILD SA with the gateway at t=5 (the gateway's own rekey would be
    due at about 18-20 s); the MN's DELETE of the old SA is sent, not yet delivered."""
    w = pair(mn_conn(), conn(child_rekey=20.0))
    connect(w)
    (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
    (req,) = [o for o in w.ini.rekey_child(ike_i, ike_i.children[0], 5.0) if isinstance(o, Send)]
    (ans,) = [o for o in w.resp.receive(req.data, I500, R500, 5.0) if isinstance(o, Send)]
    (delete,) = [o for o in w.ini.receive(ans.data, R500, I500, 5.0) if isinstance(o, Send)]
    return w, ike_i, ike_r, delete


def sends(outs: list[Output]) -> list[Send]:
    return [o for o in outs if isinstance(o, Send)]


def gateway_rekeyed_before_the_fail_over(
    ike: str = "aes128gcm16-prfsha256-x25519", lost: str = "delete"
) -> tuple[Wire, IkeSA, IkeSA, int]:
    """The gateway rekeys the MN's CHILD SA at t=5 and sends the DELETE of the old one, then
    dies before that DELETE is answered: ``lost`` "delete" (it never reached the MN, which
    still has the old SA) or "answer" (the MN deleted it; its answer was lost). Returns the
    wire, the MN's and the gateway's IKE SAs and the old CHILD SA's inbound SPI at the
    gateway."""
    w = pair(mn_conn(ike=ike), conn(ike=ike, child_rekey=20.0))
    connect(w)
    (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
    old = ike_r.children[0]
    (req,) = sends(w.resp.rekey_child(ike_r, old, 5.0))
    (ans,) = sends(w.ini.receive(req.data, R500, I500, 5.0))
    (delete,) = sends(w.resp.receive(ans.data, I500, R500, 5.0))
    if lost == "answer":
        assert len(sends(w.ini.receive(delete.data, R500, I500, 5.0))) == 1
    return w, ike_i, ike_r, old.spi_in


def crossed(w: Wire, outs_i: list[Output], outs_r: list[Output], now: float) -> None:
    """Both requests are on the wire before either answer."""
    w.deliver(outs_i, "i", now, drop=True)
    w.deliver(outs_r, "r", now, drop=True)
    reqs = w.sent[-2:]
    answer_r = w.resp.receive(reqs[0].data, I500, R500, now)
    answer_i = w.ini.receive(reqs[1].data, R500, I500, now)
    w.deliver(answer_r, "r", now)
    w.deliver(answer_i, "i", now)


# -- virtual IPs (tests/test_ikev2_vip) ------------------------------------------------------


def vip_conn() -> Connection:
    c = conn(remote_ts="10.3.0.0/16")
    return dataclasses.replace(c, pools=["p4", "p6"])


def pools(share: str | None = None) -> dict[str, Pool]:
    ip = ipaddress.ip_address
    out = {"p4": Pool("p4", ip("10.3.0.1"), ip("10.3.0.254"), (ip("10.3.0.53"),),
                      parse_range(share) if share else None),
           "p6": Pool("p6", ip("fd00::1"), ip("fd00::ff"))}  # fmt: skip
    return out


def vip_pair(vips: tuple[str, ...] = ("0.0.0.0",), share: str | None = None,
             local_id: str = "mn.test") -> Wire:  # fmt: skip
    ip = ipaddress.ip_address
    ic = dataclasses.replace(mn_conn(local_ts="0.0.0.0/0", local_id=local_id),
                             vips=[ip(v) for v in vips])  # fmt: skip
    return Wire(IkeEngine([ic]), IkeEngine([vip_conn()], pools=pools(share)))
