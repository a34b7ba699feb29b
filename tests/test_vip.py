"""The virtual gateway address's move (gateway/vip.py): one rtnetlink request to add or remove
it, a kept-open packet socket for the gratuitous ARPs, and the messages' encoding."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import sys
import textwrap

import pytest

from ipsecct.gateway import vip
from tests.helpers.netns import Namespaces

V4 = ipaddress.ip_address("192.0.2.7")
V6 = ipaddress.ip_address("2001:db8::7")


def test_address_request_layout() -> None:
    msg = vip.address_request(vip.RTM_NEWADDR, V4, 5, 77)
    n, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (n, kind, seq, pid) == (len(msg), vip.RTM_NEWADDR, 77, 0)
    assert flags == vip.NLM_F_REQUEST | vip.NLM_F_ACK | vip.NLM_F_CREATE | vip.NLM_F_REPLACE
    fam, plen, _, scope, index = struct.unpack_from("=BBBBI", msg, 16)
    assert (fam, plen, scope, index) == (socket.AF_INET, 32, 0, 5)
    # IFA_LOCAL then IFA_ADDRESS, each 4 + 4 octets
    assert msg[24:32] == struct.pack("=HH", 8, vip.IFA_LOCAL) + V4.packed
    assert msg[32:40] == struct.pack("=HH", 8, vip.IFA_ADDRESS) + V4.packed
    d = vip.address_request(vip.RTM_DELADDR, V6, 1, 1)
    assert struct.unpack_from("=H", d, 6)[0] == vip.NLM_F_REQUEST | vip.NLM_F_ACK
    assert d[17] == 128 and len(d) == 16 + 8 + 2 * 20


def test_parse_ack() -> None:
    ack = struct.pack("=IHHII", 36, vip.NLMSG_ERROR, 0, 9, 0) + struct.pack("=i", -17) + bytes(16)
    assert vip.parse_ack(ack, 9) == 17  # EEXIST
    ok = struct.pack("=IHHII", 36, vip.NLMSG_ERROR, 0, 9, 0) + bytes(20)
    assert vip.parse_ack(ok, 9) == 0
    with pytest.raises(ValueError):
        vip.parse_ack(ok, 10)  # another request's answer
    for bad in (b"", b"\xff" * 15, struct.pack("=IHHII", 8, 2, 0, 9, 0) + bytes(20)):
        with pytest.raises(ValueError):
            vip.parse_ack(bad, 9)


SCRIPT = textwrap.dedent(
    """
    import ipaddress, json, subprocess, sys, time
    from ipsecct.gateway import vip
    from ipsecct.errors import VipError
    out = {}
    def addrs():
        r = subprocess.run(["ip", "-j", "addr", "show", "dev", "d0"], capture_output=True,
                           text=True, check=True)
        return sorted(a["local"] for a in json.loads(r.stdout)[0]["addr_info"])
    v4, v6 = ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("2001:db8::7")
    s = vip.garp_socket("d0")
    vip.claim(v4, "d0", s)
    vip.claim(v4, "d0", s)  # again: kept, no error
    vip.claim(v6, "d0")
    out["claimed"] = addrs()
    vip.release(v4, "d0")
    vip.release(v4, "d0")  # gone already: no error
    vip.release(v6, "d0")
    out["released"] = addrs()
    try:
        vip.claim(v4, "nosuch0")
    except VipError as exc:
        out["error"] = str(exc)
    s.close()
    print(json.dumps(out))
    """
)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")
def test_claim_and_release_in_a_namespace() -> None:
    with Namespaces("a", "b") as ns:
        ns.veth("a", "d0", None, "b", "d1", None)
        r = ns.run("a", sys.executable, "-c", SCRIPT, timeout=60)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert "192.0.2.7" in out["claimed"] and "2001:db8::7" in out["claimed"]
        assert "192.0.2.7" not in out["released"] and "2001:db8::7" not in out["released"]
        assert "nosuch0" in out["error"]
