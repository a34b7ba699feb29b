"""swanctl.conf's keys beyond the basics (docs/ikev2.md, "swanctl.conf keys"): how they are
read, refused or accepted and ignored; what the engine does with unique, send_cert,
send_certreq, fragmentation and the CHILD SAs' volume limits (sans-I/O, two engines); and
what the gateway's adapter does with dpd_action, close_action and keyingtries (a real node,
no sockets bound). strongSwan's side: test_ikev2_strongswan.py."""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ipsecct.errors import ConfigError
from ipsecct.gateway.config import from_dict
from ipsecct.gateway.ike import IkeService
from ipsecct.gateway.node import Node
from ipsecct.ikev2 import message as M
from ipsecct.ikev2.config import Connection, parse_connections
from ipsecct.ikev2.engine import (
    ChildDown,
    ChildUp,
    ConnectFailed,
    IkeDown,
    IkeEngine,
    IkeUp,
    Send,
)
from ipsecct.ikev2.ikesa import IkeState
from ipsecct.ipsec.sad import Lifetime
from tests.helpers.ikev2_certs import cert_pki, leaf_cert, pubkey_conn
from tests.helpers.ikev2_engines import I500, PSK, R500, Wire, conn, connect, mn_conn, pair

# -- reading the keys ---------------------------------------------------------------------------

RW: dict[str, Any] = {
    "version": 2,
    "local_addrs": ["192.0.2.1"],
    "remote_addrs": "%any",
    "local": {"auth": "psk", "id": "gw.test"},
    "remote": {"auth": "psk", "id": "%any"},
    "children": {"net": {"local_ts": ["10.1.0.0/16"], "remote_ts": "10.2.0.0/16"}},
}


def _parse(patch: dict[str, Any] | None = None, child: dict[str, Any] | None = None,
           **kw: Any) -> Connection:  # fmt: skip
    d = {**RW, **(patch or {})}
    d["children"] = {"net": {**RW["children"]["net"], **(child or {})}}
    (c,) = parse_connections({"connections": {"rw": d}}, "gw.toml", {"gw.test": PSK}, **kw)
    return c


def test_swanctl_keys_of_road_warrior_and_site_to_site_configs_are_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = _parse()
    ch = c.children[0]
    # swanctl.conf's defaults (keyingtries and dpd_action not set: ipsecct's, docs/ikev2.md)
    assert (c.unique, c.send_cert, c.send_certreq, c.fragmentation) == (
        "no", "ifasked", True, "yes")  # fmt: skip
    assert c.keyingtries is None and ch.dpd_action is None and ch.close_action == "none"
    assert (ch.rekey_bytes, ch.life_bytes, ch.rekey_packets, ch.life_packets) == (0, 0, 0, 0)
    assert c.ignored == []
    with caplog.at_level(logging.WARNING):
        c = _parse({"unique": "replace", "send_cert": "always", "send_certreq": "no",
                    "fragmentation": "accept", "keyingtries": 3, "dpd_timeout": "150s",
                    "pull": "yes", "aggressive": "no", "rand_time": "5m", "if_id_in": 0,
                    "local": {**RW["local"], "round": 0}},
                   {"dpd_action": "clear", "close_action": "none", "rekey_bytes": 1000,
                    "rekey_packets": "2000", "life_packets": 5000, "hostaccess": "yes",
                    "rand_bytes": 100,
                    "ipcomp": "no", "updown": "", "mark_in": "0/0x00000000",
                    "mode": "tunnel"})  # fmt: skip
    ch = c.children[0]
    assert (c.unique, c.send_cert, c.send_certreq, c.fragmentation, c.keyingtries) == (
        "replace", "always", False, "accept", 3)  # fmt: skip
    # life_bytes: 10 % over rekey_bytes, as swanctl.conf's default
    assert (ch.rekey_bytes, ch.life_bytes, ch.rekey_packets, ch.life_packets) == (
        1000, 1100, 2000, 5000)  # fmt: skip
    ignored = " ".join(c.ignored)
    for key in ("connections.rw.dpd_timeout", "connections.rw.pull", "connections.rw.rand_time",
                "connections.rw.local.round", "connections.rw.children.net.hostaccess",
                "connections.rw.children.net.rand_bytes"):
        assert key in ignored
        assert key in caplog.text  # a WARNING names the connection and the key
    assert "config-key-ignored" in caplog.text
    # strongSwan's synonyms for the actions; TOML's booleans for yes/no
    c = _parse({"fragmentation": False, "send_certreq": True, "remote_addrs": "192.0.2.9"},
               {"dpd_action": "route", "close_action": "restart"})  # fmt: skip
    assert c.fragmentation == "no" and c.send_certreq
    assert (c.children[0].dpd_action, c.children[0].close_action) == ("trap", "start")
    assert _parse({"fragmentation": "force"}).fragmentation == "yes"  # IKEv1's: as yes


@pytest.mark.parametrize(("value", "on"), [
    ("yes", True), ("no", False), ("YES", True), (True, True), (False, False),
    ("true", True), ("false", False),
])  # fmt: skip
def test_encap_and_mobike_take_swanctls_yes_and_no(value: Any, on: bool) -> None:
    """docs/ikev2.md says yes/no may be written as strings, as swanctl.conf writes them:
    ``encap = "yes"`` and ``mobike = "no"`` were refused ("must be true or false")."""
    c = _parse({"encap": value, "mobike": value})
    assert (c.encap, c.mobike) == (on, on)
    c = _parse()  # not set: swanctl.conf's defaults
    assert (c.encap, c.mobike) == (False, True)
    for key in ("encap", "mobike"):
        with pytest.raises(ConfigError, match=f"connections\\.rw\\.{key}: must be one of: "
                           "yes, true, no, false"):  # fmt: skip
            _parse({key: "maybe"})


@pytest.mark.parametrize(("local_id", "ok"), [
    ("peer.test", True), ("PEER.test", True), (None, True), ("CN=peer.test", True),
    ("gw.test", False), ("192.0.2.1", False), ("admin@peer.test", False),
])  # fmt: skip
def test_a_local_id_our_certificate_does_not_prove_is_refused_naming_its_names(
    local_id: str | None, ok: bool
) -> None:
    """``local.id = "gw.wrong"`` beside a certificate for gw.example loaded, and every peer
    then refused the authentication (the ID we sent is not in the certificate: strongSwan
    finds no trusted public key for it). It is refused at load, naming the certificate's
    names; a DN (sent as the certificate's subject) or no local.id is left alone."""
    ca, cert, key, _ = cert_pki("p256")
    local: dict[str, Any] = {"auth": "pubkey", "certs": ["gw.pem"]}
    if local_id is not None:
        local["id"] = local_id
    remote = {"auth": "pubkey", "cacerts": ["ca.pem"], "id": "%any"}

    def parse() -> Connection:
        return _parse({"local": local, "remote": remote},
                      load_certs=lambda f: [cert if f == "gw.pem" else ca],
                      private_keys=[key])  # fmt: skip

    if ok:
        assert parse().credentials is not None
    else:
        with pytest.raises(ConfigError, match=f"^gw.toml: connections\\.rw\\.local\\.id: "
                           f"'{local_id}' is not a name of the certificate CN=peer.test "
                           "\\(dns:peer.test\\)"):  # fmt: skip
            parse()


def test_a_psk_connection_without_a_matching_secret_names_the_ids_on_both_sides() -> None:
    """A typo in local.id (or in a secret's id) said only "no [secrets.ike-*] entry whose id
    is local.id or remote.id": the operator had to find which one; both are named, and the
    ids the secrets do have. With remote.id = %any any secret may be a client's (its key is
    chosen at IKE_AUTH from the client's identity, as charon does): the connection loads."""
    with pytest.raises(ConfigError, match=r"^gw.toml: connections\.rw: no \[secrets.ike-\*\] "
                       r"entry whose id is local.id \(gw.tset\) or remote.id \(c.test\); the "
                       r"secrets' ids: 'gw.test'$"):  # fmt: skip
        _parse({"local": {"auth": "psk", "id": "gw.tset"},
                "remote": {"auth": "psk", "id": "c.test"}})  # fmt: skip
    c = _parse({"local": {"auth": "psk", "id": "gw.tset"}})
    assert c.psk == b"" and [k.ids for k in c.shared_keys] == [("gw.test",)]


def test_swanctls_comma_list_in_one_toml_list_item_is_named_as_such() -> None:
    """swanctl.conf's ``proposals = aes128gcm16-prfsha256-ecp256, aes256-sha256-modp2048``
    copied into one item of a TOML list said "unknown or unsupported algorithm
    'ecp256,aes256'", as if a word were wrong. Now it says that the item holds several
    proposals and how to write them; the same text as a string (swanctl's) is read as two."""
    for key, patch, child in (
        ("proposals", {"proposals": ["aes128gcm16-prfsha256-ecp256,aes256-sha256-modp2048"]},
         None),
        ("children.net.esp_proposals", None,
         {"esp_proposals": ["aes128gcm16, aes128-sha256"]}),
    ):  # fmt: skip
        with pytest.raises(ConfigError) as ei:
            _parse(patch, child)
        msg = str(ei.value)
        assert f"connections.rw.{key}: " in msg, msg
        assert "holds several (a comma separates proposals); one per list item: [" in msg, msg
    c = _parse({"proposals": "aes128gcm16-prfsha256-ecp256, aes256-sha256-modp2048"},
               {"esp_proposals": "aes128gcm16, aes128-sha256"})  # fmt: skip
    assert len(c.proposals) == 2 and len(c.children[0].esp_proposals) == 2


def test_a_small_volume_limit_without_its_life_key_is_not_refused_for_the_key_not_set() -> None:
    """rekey_packets = 5 alone: life_packets' default (10 % more, as swanctl's) was 5 too,
    and the configuration was refused naming life_packets, which it does not set."""
    c = _parse({}, {"rekey_packets": 5, "rekey_bytes": 9})
    ch = c.children[0]
    assert (ch.rekey_packets, ch.life_packets, ch.rekey_bytes, ch.life_bytes) == (5, 6, 9, 10)


@pytest.mark.parametrize("patch, child, why", [
    ({"unique": "sometimes"}, {}, "unique: must be one of: no, never, keep, replace"),
    ({"send_cert": "yes"}, {}, "send_cert: must be one of: ifasked, always, never"),
    ({"send_certreq": "maybe"}, {}, "send_certreq: must be one of"),
    ({"fragmentation": "always"}, {}, "fragmentation: must be one of"),
    ({"keyingtries": -1}, {}, "keyingtries: must be a whole number"),
    ({"keyingtries": "%forever"}, {}, "keyingtries: must be a whole number"),
    ({"aggressive": "yes"}, {}, "aggressive: IKEv1 Aggressive Mode"),
    ({"if_id_out": 7}, {}, "if_id_out: 7 cannot be honoured: XFRM"),
    ({"mark": 1}, {}, "mark: unknown key"),
    ({}, {"dpd_action": "hold"}, "dpd_action: must be one of"),
    ({}, {"close_action": "hold"}, "close_action: must be one of"),
    ({}, {"ipcomp": "yes"}, "ipcomp: 'yes' cannot be honoured: IPComp"),
    ({}, {"ipcomp": True}, "ipcomp: True cannot be honoured"),
    ({}, {"mode": "transport"}, "mode: 'transport' cannot be honoured: transport mode"),
    ({}, {"mode": "pass"}, "mode: 'pass' cannot be honoured: shunt policies"),
    ({}, {"updown": "/usr/lib/ipsec/_updown iptables"}, "updown: .* no updown script"),
    ({}, {"mark_out": "42"}, "mark_out: '42' cannot be honoured"),
    ({}, {"mark_in_sa": "yes"}, "mark_in_sa"),
    ({}, {"rekey_bytes": 1000, "life_bytes": 1000}, "life_bytes: must be more than"),
    ({}, {"rekey_packets": 1.5}, "rekey_packets: must be a whole number"),
    ({}, {"rand_packets": -10}, "rand_packets: must be a whole number"),
    ({}, {"replay_window": 100}, "replay_window: must be 0 or a multiple of 32 up to 65536"),
    ({}, {"replay_window": 1 << 17}, "replay_window: must be 0 or a multiple of 32"),
    ({}, {"inactivity": "30m"}, "inactivity: unknown key"),
    # trap and restart start an IKE SA: one peer address to start it with
    ({}, {"dpd_action": "restart"}, "remote_addrs: dpd_action = restart needs one peer"),
    ({}, {"close_action": "trap"}, "remote_addrs: close_action = trap needs one peer"),
])  # fmt: skip
def test_swanctl_keys_we_cannot_honour_are_refused_naming_the_key(
    patch: dict[str, Any], child: dict[str, Any], why: str
) -> None:
    where = "^gw.toml: connections\\.rw\\.(children\\.net\\.)?"
    with pytest.raises(ConfigError, match=where + why):
        _parse(patch, child)


def test_a_refused_swanctl_key_is_one_line_at_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "rw.psk").write_bytes(PSK)
    p = tmp_path / "gw.toml"
    p.write_text("""name = "gw"
[outer]
address = "192.0.2.1"
[inner]
kind = "udp"
listen = "127.0.0.1:7000"
peer = "127.0.0.1:7001"
[connections.rw]
local.id = "gw.test"
children.net.local_ts = ["10.1.0.0/16"]
children.net.remote_ts = ["10.2.0.0/16"]
children.net.ipcomp = "yes"
[secrets.ike-rw]
id = "gw.test"
file = "rw.psk"
""")
    (tmp_path / "rw.psk").chmod(0o600)
    r = subprocess.run([sys.executable, "-m", "ipsecct", "gateway", "run", "--config", str(p)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"ipsecct: error: {p}: connections.rw.children.net.ipcomp: ")
    assert "IPComp" in line


@pytest.mark.parametrize(("local_addrs", "warned"), [
    ('["192.0.2.77"]', True), ('["192.0.2.1"]', False), ('["192.0.2.0/24"]', False),
    ('"%any"', False), ('["192.0.2.77", "192.0.2.1"]', False), ('["2001:db8::1"]', True),
])  # fmt: skip
def test_local_addrs_without_an_address_of_this_gateway_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, local_addrs: str, warned: bool
) -> None:
    """``local_addrs`` with a typo (or the other gateway's address copied) loaded silently,
    and every client got NO_PROPOSAL_CHOSEN: one WARNING names the connection and both
    sides' addresses."""
    from ipsecct.gateway import config

    (tmp_path / "rw.psk").write_bytes(PSK)
    (tmp_path / "rw.psk").chmod(0o600)
    p = tmp_path / "gw.toml"
    p.write_text(f"""name = "gw"
[outer]
address = "192.0.2.1"
[inner]
kind = "udp"
listen = "127.0.0.1:7000"
peer = "127.0.0.1:7001"
[connections.rw]
local_addrs = {local_addrs}
local.id = "gw.test"
children.net.local_ts = ["10.1.0.0/16"]
children.net.remote_ts = ["10.2.0.0/16"]
[secrets.ike-rw]
id = "gw.test"
file = "rw.psk"
""")
    with caplog.at_level(logging.WARNING):
        config.load(p)
    lines = [r.getMessage() for r in caplog.records if "config-local-addrs-not-ours" in
             r.getMessage()]  # fmt: skip
    if warned:
        (line,) = lines
        assert "conn=rw" in line and "ours=192.0.2.1" in line, line
    else:
        assert lines == []


@pytest.mark.parametrize(("ports", "warned"), [
    ("local_port = 4501", True), ("local_port = 40001", False), ("local_port = 500", False),
    ("", False), ("[ike]\nport = 0", False),
])  # fmt: skip
def test_a_responders_local_port_on_no_socket_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, ports: str, warned: bool
) -> None:
    """A responder's ``local_port`` that is neither ``[ike] port`` nor the outer (NAT-T)
    port loaded silently and was never used: no socket is bound to it, and a responder
    answers on the port each request came to (a connection that starts is refused at load).
    One WARNING names the key and both ports; swanctl's default 500 says nothing."""
    from ipsecct.gateway import config

    (tmp_path / "rw.psk").write_bytes(PSK)
    (tmp_path / "rw.psk").chmod(0o600)
    p = tmp_path / "gw.toml"
    conn_port = ports if ports.startswith("local_port") else ""
    ike = ports if ports.startswith("[ike]") else ""
    p.write_text(f"""name = "gw"
[outer]
address = "192.0.2.1"
port = 40001
[inner]
kind = "udp"
listen = "127.0.0.1:7000"
peer = "127.0.0.1:7001"
[connections.rw]
{conn_port}
local.id = "gw.test"
children.net.local_ts = ["10.1.0.0/16"]
children.net.remote_ts = ["10.2.0.0/16"]
{ike}
[secrets.ike-rw]
id = "gw.test"
file = "rw.psk"
""")
    with caplog.at_level(logging.WARNING):
        config.load(p)
    lines = [r.getMessage() for r in caplog.records if "config-local-port-unused" in
             r.getMessage()]  # fmt: skip
    if warned:
        (line,) = lines
        assert "\n" not in line and "key=connections.rw.local_port" in line, line
        assert "local_port=4501" in line and "ike_port=500" in line, line
        assert "outer_port=40001" in line, line
    else:
        assert lines == []


# -- unique ---------------------------------------------------------------------------------------


def _two_clients(unique: str, initial_contact: bool) -> tuple[Wire, IkeEngine, IkeEngine]:
    """One identity (mn.test) connects twice to a gateway with ``unique``, from two
    initiator engines (a client that rebooted, or a second device with the same
    credentials); the second sends INITIAL_CONTACT or not (its unique = never)."""
    gw = IkeEngine([dataclasses.replace(conn(), unique=unique)])
    first = IkeEngine([mn_conn()])
    w = Wire(first, gw)
    connect(w)
    assert len(gw.ike_sas()) == 1
    second = IkeEngine([dataclasses.replace(mn_conn(),
                                            unique="no" if initial_contact else "never")])
    w.ini = second
    connect(w, 5.0)
    return w, first, second


def test_unique_no_replaces_only_on_initial_contact_and_never_not_even_then() -> None:
    w, _, _ = _two_clients("no", True)
    assert len(w.resp.ike_sas()) == 1 and w.resp.stats["initial-contact-replaced"] == 1
    w, _, second = _two_clients("no", False)
    assert len(w.resp.ike_sas()) == 2
    # an initiator with unique = never sends no INITIAL_CONTACT
    (new,) = [i for i in w.resp.ike_sas() if i.spi_i == second.ike_sas()[0].spi_i]
    (old,) = [i for i in w.resp.ike_sas() if i is not new]
    assert old.initial_contact and not new.initial_contact
    # never: INITIAL_CONTACT replaces nothing
    w, _, _ = _two_clients("never", True)
    assert len(w.resp.ike_sas()) == 2 and w.resp.stats["initial-contact-replaced"] == 0


def test_initial_contact_replaces_an_ike_sa_made_before_a_reload() -> None:
    """The gateway's connection read again (SIGHUP: another object of the same name, changed
    or not) between the two: INITIAL_CONTACT still replaces the identity's older IKE SA (it
    compared the objects: the rebooted client's old IKE SA stayed)."""
    gw = IkeEngine([conn()])
    w = Wire(IkeEngine([mn_conn()]), gw)
    connect(w)
    (old,) = gw.ike_sas()
    gw.connections = [dataclasses.replace(conn(), dpd_delay=20.0)]  # as IkeService.reload
    w.ini = IkeEngine([mn_conn()])
    connect(w, 5.0)
    assert gw.stats["initial-contact-replaced"] == 1
    (new,) = gw.ike_sas()
    assert new is not old and new.conn is gw.connections[0]


def test_unique_keep_refuses_the_second_ike_sa_of_an_identity() -> None:
    for ic in (True, False):
        w, _, second = _two_clients("keep", ic)
        (first,) = w.resp.ike_sas()
        assert first.state is IkeState.ESTABLISHED and len(first.children) == 1
        assert w.resp.stats["unique-kept"] == 1
        assert not second.ike_sas() and w.of("i", ConnectFailed)


def test_unique_replace_deletes_the_identitys_older_ike_sa() -> None:
    """Without INITIAL_CONTACT (a second device, or a client that sends none), the older
    IKE SA's CHILD SAs leave at once (the new ones take the identity's traffic) and it is
    deleted with a DELETE, which its peer answers; with INITIAL_CONTACT, as unique = no."""
    w, first, second = _two_clients("replace", False)
    assert w.resp.stats["unique-replaced"] == 1
    (old,) = [i for i in w.resp.ike_sas() if i.spi_i == first.ike_sas()[0].spi_i]
    assert old.state is IkeState.DELETING and not old.children
    assert [d.reason for d in w.of("r", ChildDown) if isinstance(d, ChildDown)] == [
        "replaced (unique = replace)"]
    (delete,) = [s for s in w.sent if s.src == R500 and s.data[:8] == old.spi_i
                 and s.data[18] == M.ExchangeType.INFORMATIONAL]
    (answer,) = [o for o in first.receive(delete.data, R500, I500, 5.0) if isinstance(o, Send)]
    assert not first.ike_sas()  # the first client's IKE SA is gone, and so is ours
    downs = [o for o in w.resp.receive(answer.data, I500, R500, 5.0) if isinstance(o, IkeDown)]
    assert len(downs) == 1 and old.state is IkeState.DEAD  # type: ignore[comparison-overlap]  # moved on since narrowed
    (ike,) = w.resp.ike_sas()
    assert ike.spi_i == second.ike_sas()[0].spi_i and len(ike.children) == 1
    w, _, _ = _two_clients("replace", True)
    assert len(w.resp.ike_sas()) == 1 and w.resp.stats["initial-contact-replaced"] == 1


def test_unique_replace_sends_the_delete_to_a_client_that_rebooted() -> None:
    """The first client is gone (it rebooted; its engine forgot everything): the DELETE of
    its old IKE SA goes unanswered and the old IKE SA ends after the retransmissions; the new
    one and its CHILD SA stay."""
    gw = IkeEngine([dataclasses.replace(conn(), unique="replace")])
    w = Wire(IkeEngine([mn_conn()]), gw)
    connect(w)
    (old,) = gw.ike_sas()
    w.ini = IkeEngine([dataclasses.replace(mn_conn(), unique="never")])
    n = len(w.sent)
    w.deliver(w.ini.initiate(w.ini.connections[0], I500, R500, 5.0), "i", 5.0)
    deletes = [s for s in w.sent[n:] if s.src == R500 and s.data[:8] == old.spi_i]
    assert len(deletes) == 1  # (the new engine does not know the SPIs: no answer)
    assert old.state is IkeState.DELETING and not old.children
    for t in (7.0, 11.0, 19.0, 35.0, 60.0):
        gw.tick(t)
    (new,) = gw.ike_sas()
    assert new is not old and len(new.children) == 1


def test_unique_replace_gives_the_reconnecting_identity_its_virtual_ip_back() -> None:
    """With pools: the older IKE SA's lease goes offline when it is replaced (its CHILD
    SAs are gone at once, while its DELETE is still unanswered), so the identity's new IKE
    SA gets the same address back, as after INITIAL_CONTACT."""
    from tests.helpers.ikev2_engines import pools, vip_conn

    ip = ipaddress.ip_address

    def client() -> IkeEngine:
        return IkeEngine([dataclasses.replace(mn_conn(local_ts="0.0.0.0/0"), unique="never",
                                              vips=[ip("0.0.0.0")])])  # fmt: skip

    gw = IkeEngine([dataclasses.replace(vip_conn(), unique="replace")], pools=pools())
    w = Wire(client(), gw)
    connect(w)
    (old,) = gw.ike_sas()
    assert old.vips == [("p4", ip("10.3.0.1"))]
    w.ini = client()  # the client rebooted: no INITIAL_CONTACT (unique = never)
    connect(w, 5.0)
    (new,) = [i for i in gw.ike_sas() if i is not old]
    assert old.state is IkeState.DELETING and not old.vips
    assert new.vips == [("p4", ip("10.3.0.1"))] and len(new.children) == 1


# -- send_cert, send_certreq -----------------------------------------------------------------------


def _cert_pair(gw_kw: dict[str, Any], mn_kw: dict[str, Any]) -> Wire:
    ca, gw_cert, gw_key, ca_key = cert_pki("p256")
    mn_key = cert_pki("p256")[2]
    mn_cert = leaf_cert(ca, ca_key, mn_key, "mn.test")
    gw = dataclasses.replace(pubkey_conn(conn(), gw_cert, gw_key, "CN=mn.test", ca), **gw_kw)
    mn = dataclasses.replace(pubkey_conn(mn_conn(), mn_cert, mn_key, "peer.test", ca), **mn_kw)
    w = Wire(IkeEngine([mn], wall_offset=time.time()), IkeEngine([gw], wall_offset=time.time()))
    connect(w)
    return w


def test_send_cert_and_send_certreq() -> None:
    """ifasked (the default): our CERT goes when the peer sent a CERTREQ; always: whatever
    it sent; never: not at all (a peer without our certificate cannot authenticate us);
    send_certreq = no: we send no CERTREQ."""
    w = _cert_pair({}, {})
    assert w.of("i", IkeUp) and w.of("r", IkeUp)
    # the gateway sends no CERTREQ: the client, ifasked, no CERT, and is not authenticated
    w = _cert_pair({"send_certreq": False}, {})
    assert not w.of("r", IkeUp) and w.resp.stats["auth-failed"] == 1
    # ... unless it sends its certificate always
    w = _cert_pair({"send_certreq": False}, {"send_cert": "always"})
    assert w.of("i", IkeUp) and w.of("r", IkeUp)
    # the gateway never sends its certificate: the client cannot authenticate it
    w = _cert_pair({"send_cert": "never"}, {})
    assert w.of("r", IkeUp) and not w.of("i", IkeUp) and w.of("i", ConnectFailed)  # type: ignore[arg-type]  # (E inferred from the left operand)


# -- fragmentation -------------------------------------------------------------------------------


@pytest.mark.parametrize("gw, mn, announced, gw_sends, mn_sends", [
    ("yes", "yes", True, True, True),
    ("accept", "yes", True, False, True),  # announced, the gateway's own go whole
    ("no", "yes", False, False, False),  # not announced: nobody fragments
    ("yes", "no", False, False, False),
])  # fmt: skip
def test_fragmentation_yes_accept_no(
    gw: str, mn: str, announced: bool, gw_sends: bool, mn_sends: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import ipsecct.ikev2.engine as E

    monkeypatch.setattr(E, "FRAGMENT_SIZE", 150)
    w = pair(dataclasses.replace(mn_conn(), fragmentation=mn),
             dataclasses.replace(conn(), fragmentation=gw))  # fmt: skip
    connect(w)
    (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
    assert ike_i.fragmentation is ike_r.fragmentation is announced
    w.deliver(w.resp.liveness(ike_r, 1.0), "r", 1.0)  # (its answer is small)
    w.deliver(w.resp.rekey_child(ike_r, ike_r.children[0], 2.0), "r", 2.0)
    assert len(w.of("i", ChildUp)) == 2
    assert (w.resp.stats["fragmented-sent"] > 0) is gw_sends
    assert (w.ini.stats["fragmented-sent"] > 0) is mn_sends


def test_fragment_size_bounds_every_datagram_we_send(tmp_path: Path) -> None:
    """[ike] fragment_size (strongSwan's charon.fragment_size): the largest IP datagram of
    an IKE message or fragment we send. Over a path of MTU 1000 whose IP fragments a
    middlebox drops, the gateway's 1200-octet fragments never reached a strongSwan client
    set to fragment_size = 1000 (tried in network namespaces, 2026-12-03): each was split by
    IP. With it, a certificate exchange goes in fragments that fit, and the IP, UDP and,
    on the NAT-T port, non-ESP marker headers are counted."""
    import ipsecct.ikev2.engine as E

    ca, gw_cert, gw_key, ca_key = cert_pki("p256")
    mn_key = cert_pki("p256")[2]
    mn_cert = leaf_cert(ca, ca_key, mn_key, "mn.test")
    gw = pubkey_conn(conn(), gw_cert, gw_key, "CN=mn.test", ca)
    mn = pubkey_conn(mn_conn(), mn_cert, mn_key, "peer.test", ca)
    for size in (None, 576):
        w = Wire(IkeEngine([mn], wall_offset=time.time(), fragment_size=size),
                 IkeEngine([gw], wall_offset=time.time(), fragment_size=size))  # fmt: skip
        connect(w)
        assert w.of("i", IkeUp) and w.of("r", IkeUp)
        longest = max(len(s.data) for s in w.sent) + 20 + 8  # IPv4 and UDP, port 500
        if size is None:  # the certificate exchange goes whole (1200 octets of IKE)
            assert 576 < longest <= E.FRAGMENT_SIZE + 28, longest
            assert w.resp.stats["fragmented-sent"] == 0
        else:
            assert longest <= 576, longest
            assert w.resp.stats["fragmented-sent"] == w.ini.stats["fragmented-sent"] == 1
            assert w.resp.stats["fragmented-received"] == 1
    (ike,) = w.resp.ike_sas()
    assert w.resp._ike_octets(ike) == 576 - 28  # IPv4, port 500
    ike.local = dataclasses.replace(ike.local, port=4500)
    ike.remote = dataclasses.replace(ike.remote, port=4500)
    assert w.resp._ike_octets(ike) == 576 - 28 - 4  # the non-ESP marker
    with pytest.raises(ValueError, match="below 576"):
        IkeEngine([gw], fragment_size=575)
    # the configuration's key, and its bounds
    base = {"name": "gw", "outer": {"address": "192.0.2.1"},
            "inner": {"kind": "udp", "listen": "127.0.0.1:7000", "peer": "127.0.0.1:7001"}}
    assert from_dict(base, str(tmp_path / "gw.toml")).ike_fragment_size is None
    cfg = from_dict({**base, "ike": {"fragment_size": 1000}}, str(tmp_path / "gw.toml"))
    assert cfg.ike_fragment_size == 1000
    for bad in (575, 65536, "1000"):
        with pytest.raises(ConfigError, match=r"ike\.fragment_size"):
            from_dict({**base, "ike": {"fragment_size": bad}}, str(tmp_path / "gw.toml"))


# -- rekey_bytes/packets, life_bytes/packets ----------------------------------------------------


def test_child_volume_limits_rekey_then_close_the_child_sa() -> None:
    """The ESP SAs carry the soft (rekey_*) and hard (life_*) volume limits; the soft one
    makes the engine rekey the CHILD SA now, the hard one remove it and send its DELETE.
    (No sequence number is involved: a rekey makes new SAs with new keys.)"""
    child = dataclasses.replace(conn().children[0], rekey_bytes=10_000, life_bytes=11_000,
                                rekey_packets=50, life_packets=60)  # fmt: skip
    w = pair(mn_conn(), dataclasses.replace(conn(), children=[child]))
    connect(w)
    (ike_r,) = w.resp.ike_sas()
    old = ike_r.children[0]
    _, out_sa, in_sa = old.sas(R500, I500, False, "t")
    for sa in (out_sa, in_sa):
        assert sa.soft == Lifetime(bytes=10_000, packets=50)
        assert sa.hard == Lifetime(seconds=None, bytes=11_000, packets=60)
    w.deliver(w.resp.volume_limit(ike_r, old, False, 1.0), "r", 1.0)
    assert w.resp.stats["child-rekey-volume"] == 1 and len(w.of("i", ChildUp)) == 2
    assert old not in ike_r.children and len(ike_r.children) == 1
    # the second half's event (or a repeat) does nothing more
    w.deliver(w.resp.volume_limit(ike_r, old, False, 1.5), "r", 1.5)
    assert w.resp.stats["child-rekey-volume"] == 1
    new = ike_r.children[0]
    w.deliver(w.resp.volume_limit(ike_r, new, True, 2.0), "r", 2.0)
    assert not ike_r.children and not w.ini.ike_sas()[0].children
    assert [d.reason for d in w.of("r", ChildDown) if isinstance(d, ChildDown)][-1] == "expired"
    assert ike_r.state is IkeState.ESTABLISHED


def test_replay_window_is_the_child_sas_inbound_window() -> None:
    """children.*.replay_window (swanctl.conf's key; ipsecct's default stays 64): the demo's
    IKE-keyed tunnel lost the packets sg1 forwarded after a handover, overtaken by more than
    64 the MN sent straight to sg2; its manual tunnels have 1024."""
    assert _parse({}, {}).children[0].replay_window == 64
    assert _parse({}, {"replay_window": "1024"}).children[0].replay_window == 1024
    child = dataclasses.replace(conn().children[0], replay_window=1024)
    w = pair(mn_conn(), dataclasses.replace(conn(), children=[child]))
    connect(w)
    (ike_r,) = w.resp.ike_sas()
    _, _, in_sa = ike_r.children[0].sas(R500, I500, False, "t")
    assert in_sa.replay_window == 1024 and in_sa.window.size == 1024
    _, _, in_i = w.ini.ike_sas()[0].children[0].sas(I500, R500, False, "t")
    assert in_i.window.size == 64  # the initiator's own configuration: the default


# -- the adapter: dpd_action, close_action, keyingtries -----------------------------------------


def test_a_peer_that_stops_answering_our_rekey_is_dead_for_dpd_action() -> None:
    """Any request of ours the peer never answers ends the IKE SA as "peer-dead" (what
    dpd_action acts on, as strongSwan's retransmission timeout does), a CHILD or IKE rekey
    too (they ended it as "deleted": a start_action = start initiator whose peer died during
    a rekey never connected again); our own DELETE of the IKE SA still ends it as deleted."""
    for start, end in (("rekey-child", "peer-dead"), ("rekey-ike", "peer-dead"),
                       ("delete", "deleted")):  # fmt: skip
        w = pair()
        connect(w)
        (ir,) = w.resp.ike_sas()
        if start == "rekey-child":
            first = w.resp.rekey_child(ir, ir.children[0], 1.0)
        else:
            first = w.resp.rekey_ike(ir, 1.0) if start == "rekey-ike" else w.resp.delete(ir, 1.0)
        w.deliver(first, "r", 1.0, drop=True)
        for t in (3.0, 5.0, 9.0, 17.0, 33.0, 70.0):
            w.deliver(w.resp.tick(t), "r", t, drop=True)
        assert [d.reason for d in w.of("r", IkeDown) if isinstance(d, IkeDown)] == [end], start


def test_after_down_follows_dpd_action_and_close_action() -> None:
    def c(**kw: Any) -> Connection:
        return dataclasses.replace(mn_conn(), children=[
            dataclasses.replace(mn_conn().children[0], **kw)])  # fmt: skip

    assert c().after_down("peer-dead", True) is None
    assert c(start_action="start").after_down("peer-dead", True)[0] == "restart"  # type: ignore[index]
    assert c(start_action="start", dpd_action="clear").after_down("peer-dead", True) is None
    assert c(dpd_action="trap").after_down("peer-dead", False)[0] == "trap"  # type: ignore[index]
    assert c(dpd_action="restart").after_down("deleted by peer", True) is None
    assert c(close_action="start").after_down("deleted by peer", True)[0] == "restart"  # type: ignore[index]
    assert c(close_action="trap").after_down("deleted by peer", True)[0] == "trap"  # type: ignore[index]
    assert c(close_action="start", dpd_action="trap").after_down("deleted", True) is None


class _Loop:
    """What _retry_later asks of the running loop: call_later, recorded."""

    def __init__(self) -> None:
        self.later: list[tuple[float, Any, tuple[Any, ...]]] = []

    def call_later(self, delay: float, fn: Any, *args: Any) -> Any:
        self.later.append((delay, fn, args))
        return _Handle()


class _Handle:
    def cancel(self) -> None:
        pass


def _mn(tmp: Path, monkeypatch: pytest.MonkeyPatch,
        **child_kw: Any) -> tuple[IkeService, list[Send], list[float], _Loop]:  # fmt: skip
    """A node (the MN) whose connection to the gateway at R500 has ``child_kw``."""
    import asyncio

    base = mn_conn(dpd=10)
    c = dataclasses.replace(
        base, remote_addrs=[ipaddress.ip_network(f"{R500.host}/32")],
        keyingtries=child_kw.pop("keyingtries", None),
        children=[dataclasses.replace(base.children[0], **child_kw)],
    )  # fmt: skip
    cfg = from_dict({
        "name": "mn",
        "outer": {"address": str(I500.host), "port": 45030},
        "inner": {"kind": "udp", "listen": "127.0.0.1:45031", "peer": "127.0.0.1:45032"},
    }, str(tmp / "mn.toml"))  # fmt: skip
    node = Node(cfg, role="node")
    svc = IkeService(node, [c])
    sent: list[Send] = []
    monkeypatch.setattr(svc, "_send", sent.append)
    monkeypatch.setattr(node, "send_esp", lambda sa, data: None)
    clock = [10.0]
    monkeypatch.setattr(node, "clock", lambda: clock[0])
    loop = _Loop()
    monkeypatch.setattr(asyncio, "get_running_loop", lambda: loop)
    return svc, sent, clock, loop


def _exchange(svc: IkeService, gw: IkeEngine, sent: list[Send], now: float) -> None:
    pending = list(sent)
    sent.clear()
    while pending:
        s = pending.pop(0)
        for o in gw.receive(s.data, s.src, s.dst, now):
            if isinstance(o, Send):
                svc._receive(o.data, o.src, o.dst)
                pending += sent
                sent.clear()


def _peer_dies(svc: IkeService, clock: list[float]) -> None:
    """The gateway stops answering: the MN's liveness check goes unanswered 30 s."""
    (ike,) = svc.engine.ike_sas()
    svc._act(svc.engine.liveness(ike, clock[0]))
    _wait(svc, clock, lambda: ike.state is IkeState.DEAD)
    assert svc.engine.stats["peer-dead"] == 1


def _wait(svc: IkeService, clock: list[float], done: Any) -> None:
    """The engine's timer, 2 s at a time, until ``done()`` (at most two minutes)."""
    for _ in range(60):
        if done():
            return
        clock[0] += 2
        svc._act(svc.engine.tick(clock[0]))
    raise AssertionError("not done after 120 s")


def test_dpd_action_restart_starts_again_at_once_and_clear_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for action in ("restart", "clear"):
        svc, sent, clock, _ = _mn(tmp_path, monkeypatch, start_action="start",
                                  dpd_action=action)  # fmt: skip
        svc.initiate(svc.engine.connections[0])
        _exchange(svc, IkeEngine([conn()]), sent, clock[0])
        assert len(svc.engine.ike_sas()) == 1
        sent.clear()
        _peer_dies(svc, clock)
        restarted = [s for s in sent if s.data[18] == M.ExchangeType.IKE_SA_INIT]
        assert (len(restarted), len(svc.engine.connecting)) == (
            (1, 1) if action == "restart" else (0, 0))
        assert not svc._restarts.waiting  # (at once the first time, or never)


@pytest.mark.parametrize("dpd_action", [None, "restart"])
def test_a_node_whose_ike_sa_the_gateway_rekeyed_still_starts_again_when_it_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dpd_action: str | None
) -> None:
    """The gateway rekeys the IKE SA (strongSwan's rekey_time, 4 h by default): it is the
    new IKE SA's initiator, the node its responder. The node's start_action = start (and
    dpd_action = restart's default) went by ``we_initiated``: once the gateway had rekeyed,
    a dead gateway left the node without a tunnel for good. It is the node's connection:
    who sent the first IKE_SA_INIT counts (RFC 4555's original initiator)."""
    svc, sent, clock, _ = _mn(tmp_path, monkeypatch, start_action="start",
                              dpd_action=dpd_action)  # fmt: skip
    svc.initiate(svc.engine.connections[0])
    gw = IkeEngine([conn()])
    _exchange(svc, gw, sent, clock[0])
    (ike_r,) = gw.ike_sas()
    pending = gw.rekey_ike(ike_r, clock[0])
    while pending:  # the gateway's rekey, the node's answer, the old IKE SA's DELETE
        o = pending.pop(0)
        if isinstance(o, Send):
            svc._receive(o.data, o.src, o.dst)
            for s in sent:
                pending += gw.receive(s.data, s.src, s.dst, clock[0])
            sent.clear()
    (ike,) = [i for i in svc.engine.ike_sas() if i.state is IkeState.ESTABLISHED]
    assert not ike.we_initiated and svc.engine.stats["ike-sa-rekeyed"] >= 1
    _peer_dies(svc, clock)
    restarted = [s for s in sent if s.data[18] == M.ExchangeType.IKE_SA_INIT]
    assert len(restarted) + len(svc._restarts.waiting) == 1


@pytest.mark.parametrize("how", ["removed", "changed"])
def test_a_reload_gives_up_a_removed_connections_restart_and_a_changed_one_restarts_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """SIGHUP (IkeService.reload) while a start_action = start connection waits to start
    again: removed, it is not started again (it restarted the connection the operator had
    taken out); changed, its restart starts the connection as the file now has it."""
    svc, sent, clock, _ = _mn(tmp_path, monkeypatch, start_action="start")
    (old,) = svc.engine.connections
    svc.initiate(old)
    _exchange(svc, IkeEngine([conn()]), sent, clock[0])
    sent.clear()
    _peer_dies(svc, clock)
    assert list(svc._restarts.waiting) == [old.name]
    new = dataclasses.replace(old, proposals=old.proposals[:1])
    if how == "removed":
        svc.reload([], set(), {old.name})
        assert not svc._restarts.waiting and svc.engine.connections == []
    else:
        svc.reload([new], set(), set())
        assert svc._restarts.waiting[old.name].what[0] is new  # type: ignore[index]
    for _ in range(30):  # a minute of the engine's timer and the restarts' (1 s, with jitter)
        clock[0] += 2
        svc._act(svc.engine.tick(clock[0]))
        svc._run_restarts(clock[0])
    inits = [s for s in sent if s.data[18] == M.ExchangeType.IKE_SA_INIT]
    assert bool(inits) == (how == "changed")
    assert all(c.conn is new for c in svc.engine.connecting.values())


def test_dpd_action_trap_arms_a_trap_that_the_next_packet_springs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ipsecct.ipsec.ippacket import build_udp

    svc, sent, clock, _ = _mn(tmp_path, monkeypatch, dpd_action="trap")
    svc.initiate(svc.engine.connections[0])
    _exchange(svc, IkeEngine([conn()]), sent, clock[0])
    pkt = build_udp(ipaddress.ip_address("10.2.0.5"), ipaddress.ip_address("10.1.0.9"), 4000,
                    5000, b"payload")  # fmt: skip
    svc.node.from_inner(pkt)  # up: protected, no trap
    assert svc.engine.stats["trap-acquired"] == 0
    _peer_dies(svc, clock)
    # nothing until traffic comes
    assert not svc.engine.connecting and all(s.data[18] != M.ExchangeType.IKE_SA_INIT
                                             for s in sent)  # fmt: skip
    clock[0] += 5
    svc.node.from_inner(pkt)
    assert svc.engine.stats["trap-acquired"] == 1 and len(svc.engine.connecting) == 1


def test_a_spoofed_ike_sa_init_does_not_keep_a_trap_from_starting_the_ike_sa(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start_action = trap: an IKE_SA_INIT with the peer's address as its source (anyone can
    send one) left a half-open IKE SA of the connection here for 30 s, which the trap took
    for the connection's IKE SA being up: the packet started nothing, and one such datagram
    every 30 s kept the tunnel down."""
    from ipsecct.ipsec.ippacket import build_udp

    svc, sent, clock, _ = _mn(tmp_path, monkeypatch, start_action="trap")
    spoofer = IkeEngine([mn_conn(local_id="gw.test", remote_id="%any")])
    for o in spoofer.initiate(spoofer.connections[0], R500, I500, clock[0]):
        if isinstance(o, Send):
            svc._receive(o.data, o.src, o.dst)  # from the peer's address, to ours
    assert [i.state for i in svc.engine.ike_sas()] == [IkeState.HALF_OPEN]
    sent.clear()
    pkt = build_udp(ipaddress.ip_address("10.2.0.5"), ipaddress.ip_address("10.1.0.9"), 4000,
                    5000, b"payload")  # fmt: skip
    svc.node.from_inner(pkt)
    assert svc.engine.stats["trap-acquired"] == 1 and len(svc.engine.connecting) == 1
    assert any(s.data[18] == M.ExchangeType.IKE_SA_INIT for s in sent)


def test_close_action_start_restarts_when_the_peer_deletes_the_ike_sa(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, sent, clock, _ = _mn(tmp_path, monkeypatch, close_action="start")
    svc.initiate(svc.engine.connections[0])
    gw = IkeEngine([conn()])
    _exchange(svc, gw, sent, clock[0])
    (ike_r,) = gw.ike_sas()
    for o in gw.delete(ike_r, clock[0]):  # the gateway closes the IKE SA
        if isinstance(o, Send):
            svc._receive(o.data, o.src, o.dst)
    assert not svc.engine.ike_sas() and len(svc.engine.connecting) == 1


def test_keyingtries_bounds_the_attempts_and_unset_tries_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """start_action = start with keyingtries = 2: the first attempt and one retry, then it
    gives up (logged); without keyingtries (ipsecct's default) the retries go on."""
    for tries, attempts in ((2, 2), (None, 5)):
        svc, _, clock, _ = _mn(tmp_path, monkeypatch, start_action="start",
                               keyingtries=tries)  # fmt: skip
        eng = svc.engine
        name = eng.connections[0].name
        svc.initiate(eng.connections[0])
        n = 1
        while True:
            # no answer: given up after the retransmissions
            _wait(svc, clock, lambda e=eng: not e.connecting)
            due = svc._restarts.waiting.get(name)
            if due is None or n == 5:  # no retry scheduled (or enough seen)
                break
            clock[0] = max(clock[0], due.at)
            svc._on_timer(clock[0])  # the node's one timer: the retry goes
            assert eng.connecting
            n += 1
        assert n == attempts
    assert "ike-connect-gave-up" in caplog.text


def test_the_restart_back_off_doubles_to_a_minute_with_jitter_and_starts_over_when_stable(
) -> None:  # fmt: skip
    """ikev2/restart.py alone (sans-I/O): at once (when asked), then 1 s doubling to 60 s,
    each shortened by up to 25 % (the random draw at its ends); per key; up 60 s: over."""
    from ipsecct.ikev2 import restart

    for draw, factor in ((0.0, 1.0), (1.0, 0.75)):
        r = restart.Restarts(rand=lambda d=draw: d)  # type: ignore[misc]  # (a default-bound lambda)
        waits = []
        now = 0.0
        for _ in range(9):
            d = r.schedule("c", now, at_once=True)
            waits.append(d.at - now)
            assert r.next_deadline() == d.at and r.due(d.at - 0.001) == []
            assert r.due(d.at) == [d] and r.next_deadline() is None
            now = d.at
            r.up("c", now)  # up, and deleted at once: not stable
        assert waits == [0.0] + [factor * x for x in (1, 2, 4, 8, 16, 32, 60, 60)]
        assert r.schedule("other", now).at - now == factor * 1.0  # its own back-off
        r.up("c", now)
        later = now + restart.STABLE
        assert r.schedule("c", later, at_once=True).at == later  # over: at once again
        r.cancel("c")
        assert "c" not in r.waiting and r.schedule("c", now, at_once=True).attempt == 1


@pytest.mark.parametrize("peer", ["deletes-ike", "deletes-child", "refuses"])
def test_restarts_against_a_peer_that_deletes_or_refuses_back_off_to_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    peer: str,
) -> None:  # fmt: skip
    """The node's peer (an engine) deletes each IKE SA as soon as it is up (close_action =
    start), or each CHILD SA alone (close_action = start in the IKE SA), or refuses the node
    (another key; start_action = start): the node's timer runs every 0.25 s for 300 s.
    Before, a restart went at once each time: one attempt per step (1,200). Now the first
    goes at once, then 1 s doubling to 60 s, each shortened by up to 25 % at random: about
    ten attempts, the last ones 45 to 60 s apart; one ``ike-retry`` line each, with its
    delay. A connection that then stays up a minute starts over: the next restart goes at
    once."""
    kw: dict[str, Any] = {"start_action": "start"} if peer == "refuses" else {
        "close_action": "start"}  # fmt: skip
    svc, sent, clock, _ = _mn(tmp_path, monkeypatch, **kw)
    gw = IkeEngine([conn(psk=b"not the node's key" if peer == "refuses" else PSK)])
    eng = svc.engine
    attempts: list[float] = []
    for name in ("initiate", "create_child"):
        orig = getattr(eng, name)
        monkeypatch.setattr(eng, name, lambda *a, o=orig, **k: (attempts.append(clock[0]),  # type: ignore[func-returns-value]
                                                                o(*a, **k))[1])  # fmt: skip

    def run(until: float, delete: bool) -> None:
        while clock[0] < until:
            _exchange(svc, gw, sent, clock[0])
            for ike_r in gw.ike_sas():
                if ike_r.state is not IkeState.ESTABLISHED or not delete:
                    continue
                if peer == "deletes-ike":
                    outs = gw.delete(ike_r, clock[0])
                else:
                    outs = [o for c in list(ike_r.children)
                            for o in gw.delete_child(ike_r, c, clock[0])]  # fmt: skip
                for o in outs:
                    if isinstance(o, Send):
                        svc._receive(o.data, o.src, o.dst)
            clock[0] += 0.25
            svc._on_timer(clock[0])  # the node's one timer (the engine's, the restarts')
            gw.tick(clock[0])

    with caplog.at_level(logging.INFO, logger="ipsecct"):
        svc.initiate(eng.connections[0])
        if peer == "deletes-child":
            _exchange(svc, gw, sent, clock[0])
            attempts.clear()  # (the IKE SA stays: what is counted is the CHILD SAs asked for)
        start = clock[0]
        run(start + 300.0, True)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert 8 <= len(attempts) <= 14, (peer, gaps)
    assert max(gaps) <= 60.25 and gaps[-1] >= 45.0, gaps
    assert all(b >= a for a, b in itertools.pairwise(gaps) if a < 40.0), gaps  # growing
    retries = [r.getMessage() for r in caplog.records if "event=ike-retry" in r.getMessage()]
    first = 0 if peer == "deletes-child" else 1  # (the IKE SA's first try is not a retry)
    assert len(retries) == len(attempts) - first + len(svc._restarts.waiting)
    assert all("delay_s=" in r and "attempt=" in r for r in retries)
    if peer == "refuses":
        return
    # the peer lets it be: up (the restart waiting goes), for a minute (liveness checks
    # answered), then deleted once more
    run(clock[0] + 61.0, False)
    assert [i.state for i in eng.ike_sas()] == [IkeState.ESTABLISHED]
    run(clock[0] + 61.0, False)
    n = len(attempts)
    run(clock[0] + 0.5, True)
    assert len(attempts) == n + 1 and attempts[-1] >= clock[0] - 0.75


def test_rekey_packets_counted_by_the_data_path_rekeys_and_life_packets_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packets through the node's data path (the C path where built, which hands the one at
    the limit up) reach the CHILD SA's rekey_packets: the adapter (Node.on_lifetime) has the
    engine rekey it, and the new SAs carry the traffic; a CHILD SA that reaches
    life_packets (its rekey unanswered) is removed and its DELETE sent."""
    from ipsecct.ipsec.ippacket import build_udp

    pkt = build_udp(ipaddress.ip_address("10.2.0.5"), ipaddress.ip_address("10.1.0.9"), 4000,
                    5000, b"payload")  # fmt: skip
    for answered in (True, False):
        svc, sent, clock, _ = _mn(tmp_path, monkeypatch, rekey_packets=5, life_packets=8)
        esp: list[Any] = []
        monkeypatch.setattr(svc.node, "send_esp", lambda sa, data, e=esp: e.append(sa))
        gw = IkeEngine([conn()])
        svc.initiate(svc.engine.connections[0])
        _exchange(svc, gw, sent, clock[0])
        (ike,) = svc.engine.ike_sas()
        (first,) = ike.children
        for _ in range(4):
            svc.node.from_inner(pkt)
        assert svc.engine.stats["child-rekey-volume"] == 0 and not sent
        svc.node.from_inner(pkt)  # the 5th: the soft limit
        assert svc.engine.stats["child-rekey-volume"] == 1
        (req,) = sent
        assert req.data[18] == M.ExchangeType.CREATE_CHILD_SA
        if answered:
            _exchange(svc, gw, sent, clock[0])
            (new,) = ike.children
            assert new is not first and new.spi_out != first.spi_out
            svc.node.from_inner(pkt)
            assert esp[-1].spi == new.spi_out  # the traffic goes into the new CHILD SA
        else:
            sent.clear()
            for _ in range(3):  # 6, 7, 8: the hard limit
                svc.node.from_inner(pkt)
            # the 8th is the last one processed (swanctl.conf: "maximum packets processed")
            assert svc.engine.stats["child-expired-volume"] == 1 and not ike.children
            assert not svc.node.engine.find_sa(first.spi_out)
            svc.node.from_inner(pkt)  # no SA: not sent
            assert len({s.spi for s in esp}) == 1 and len(esp) == 8
            # its DELETE waits for the rekey in flight (window of one), then goes
            assert ike.queued_deletes == [first.spi_in.to_bytes(4, "big")]


# -- a new CHILD SA in an IKE SA that is up (close_action, a trap) ------------------------------


def test_create_child_asks_for_a_new_child_sa_in_the_ike_sa() -> None:
    """CREATE_CHILD_SA without REKEY_SA (§1.3.1), started by us: after the gateway deleted
    the MN's only CHILD SA, the MN asks for a new one of the same child; both sides install
    it with new SPIs and keys. Behind an exchange in flight it waits (window of one)."""
    w = pair(mn_conn(dpd=10), conn())
    connect(w)
    (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
    old = ike_i.children[0]
    w.deliver(w.resp.delete_child(ike_r, ike_r.children[0], 1.0), "r", 1.0)
    assert not ike_i.children and not ike_r.children
    cc = w.ini.connections[0].children[0]
    n = len(w.sent)
    w.deliver(w.ini.liveness(ike_i, 2.0), "i", 2.0, drop=True)  # in flight, lost
    w.deliver(w.ini.create_child(ike_i, cc, 2.0), "i", 2.0)
    assert len(w.sent) == n + 1 and ike_i.children_wanted == [cc]  # it waits
    w.deliver(w.ini.tick(4.0), "i", 4.0)  # the liveness check again, answered
    w.deliver(w.ini.tick(4.0), "i", 4.0)  # then the new CHILD SA
    (new_i,), (new_r,) = ike_i.children, ike_r.children
    assert new_i.config is cc and new_i.spi_in != old.spi_in
    assert (new_i.spi_in, new_i.spi_out) == (new_r.spi_out, new_r.spi_in)
    assert w.ini.stats["child-sa-created"] == 1 and not ike_i.children_wanted
    assert [str(t) for t in new_i.local_ts] == ["10.2.0.5/32"]


def test_create_child_refused_or_crossing_an_ike_rekey_leaves_nothing_behind() -> None:
    # the gateway takes none of it: TS_UNACCEPTABLE, our SPI free again
    w = pair(mn_conn(local_ts="10.9.0.5/32"), conn())
    connect(w)  # (the first CHILD SA was refused too: the IKE SA is up without one)
    (ike_i,) = w.ini.ike_sas()
    w.deliver(w.ini.create_child(ike_i, w.ini.connections[0].children[0], 1.0), "i", 1.0)
    assert w.ini.stats["child-create-failed"] == 1 and not ike_i.children
    assert w.ini._child_spis == set()
    # the peer's IKE rekey crosses our request: refused TEMPORARY_FAILURE, ours goes on
    w = pair(mn_conn(), conn())
    connect(w)
    (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
    (req,) = [o for o in w.ini.create_child(ike_i, w.ini.connections[0].children[0], 1.0)
              if isinstance(o, Send)]  # fmt: skip
    (rekey,) = [o for o in w.resp.rekey_ike(ike_r, 1.0) if isinstance(o, Send)]
    answers = [o for o in w.ini.receive(rekey.data, R500, I500, 1.0) if isinstance(o, Send)]
    assert w.ini.stats["ike-rekey-refused-child-rekey"] == 1
    w.deliver([*answers], "i", 1.0)
    w.deliver(w.resp.receive(req.data, I500, R500, 1.0), "r", 1.0)
    assert len(ike_i.children) == 2 and len(ike_r.children) == 2


def test_a_new_child_sa_in_flight_is_a_delete_owed_in_the_ike_sa_context() -> None:
    """Replicated or moved while our CREATE_CHILD_SA is in flight: the peer may have made
    the SA under the SPI we proposed, and the taker does not have it; the context owes its
    DELETE (item 30), as for a CHILD rekey in flight. And the IKE SA's engine keeps the SPI
    only while the request lives."""
    from ipsecct.ikev2 import context

    w = pair(mn_conn(), conn())
    connect(w)
    (ike_i,) = w.ini.ike_sas()
    w.deliver(w.ini.create_child(ike_i, w.ini.connections[0].children[0], 1.0), "i", 1.0,
              drop=True)  # fmt: skip
    p = ike_i.pending
    assert p is not None and p.kind == "create-child"
    spi = int.from_bytes(p.spi, "big")
    assert context.deletes_owed(ike_i) == [spi] and spi in w.ini._child_spis
    w.deliver(w.ini.delete(ike_i, 2.0), "i", 2.0)  # (our DELETE replaces the request)
    assert spi not in w.ini._child_spis


def test_close_action_start_asks_for_the_child_sa_the_peer_deleted_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for action in ("start", "trap"):
        from ipsecct.ipsec.ippacket import build_udp

        svc, sent, clock, _ = _mn(tmp_path, monkeypatch, close_action=action)
        esp: list[Any] = []
        monkeypatch.setattr(svc.node, "send_esp", lambda sa, data, e=esp: e.append(sa))
        svc.initiate(svc.engine.connections[0])
        gw = IkeEngine([conn()])
        _exchange(svc, gw, sent, clock[0])
        (ike_r,) = gw.ike_sas()
        (ike,) = svc.engine.ike_sas()
        first = ike.children[0]
        for o in gw.delete_child(ike_r, ike_r.children[0], clock[0]):  # the gateway's DELETE
            if isinstance(o, Send):
                svc._receive(o.data, o.src, o.dst)
        assert first not in ike.children
        pkt = build_udp(ipaddress.ip_address("10.2.0.5"), ipaddress.ip_address("10.1.0.9"),
                        4000, 5000, b"payload")  # fmt: skip
        if action == "trap":
            # nothing until a packet comes; then the trap asks for it in the IKE SA that is up
            assert not [s for s in sent if s.data[18] == M.ExchangeType.CREATE_CHILD_SA]
            clock[0] += 5
            svc.node.from_inner(pkt)
            assert svc.engine.stats["trap-acquired"] == 1
        (req,) = [s for s in sent if s.data[18] == M.ExchangeType.CREATE_CHILD_SA]
        sent[:] = [req]
        _exchange(svc, gw, sent, clock[0])
        (new,) = ike.children
        assert new.spi_out == ike_r.children[0].spi_in and not svc.engine.connecting
        svc.node.from_inner(pkt)
        assert esp[-1].spi == new.spi_out, action


# -- children.*.life_time, and what `ipsecct sa list` says of the deadlines ---------------------


def test_life_time_closes_the_child_sa_at_its_end_and_sa_list_shows_when(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """children.*.life_time (issue 10's key; docs/ikev2.md: supported) had no test: it is the
    hard lifetime of the CHILD SA's ESP SAs; at its end, with no packet and no rekey
    (rekey_time 0), the node's timer removes the CHILD SA and the engine sends its DELETE.
    ``ipsecct sa list`` shows, as ``swanctl --list-sas`` does, our identity, the IKE and
    CHILD SAs' rekey and expiry deadlines and the ESP-in-UDP mode."""
    from ipsecct.commands.sa import _print_ike

    svc, sent, clock, _ = _mn(tmp_path, monkeypatch, rekey_time=None, life_time=30.0)
    gw = IkeEngine([conn()])
    svc.initiate(svc.engine.connections[0])
    _exchange(svc, gw, sent, clock[0])
    (ike,) = svc.engine.ike_sas()
    (child,) = ike.children
    for sa in child.handle.sas():  # type: ignore[attr-defined]
        assert sa.hard == Lifetime(seconds=30.0)
    assert child.rekey_at is None

    clock[0] += 10
    (row,) = svc.list()
    assert row["local_id"] == "mn.test" and row["rekey_in_s"] is None
    children: list[dict[str, Any]] = row["children"]  # type: ignore[assignment]
    (c,) = children
    assert c["expires_in_s"] == 20 and c["rekey_in_s"] is None
    assert c["encap"] is True  # the node's SAs are ESP in UDP (no raw ESP socket here)
    _print_ike([row])
    text = capsys.readouterr().out
    assert "  local  192.0.2.10:500 id mn.test\n" in text, text
    assert ", TUNNEL-in-UDP, ESP in 0x" in text, text
    assert "    installed 10.0 s ago, expires in 20 s\n" in text, text

    sent.clear()
    clock[0] = 39.5  # created at 10: still up half a second before the end
    svc.node._engine_timer(clock[0])
    assert ike.children == [child]
    clock[0] = 40.5
    with caplog.at_level(logging.INFO, logger="ipsecct.ikev2"):
        svc.node._engine_timer(clock[0])
    assert 'event=child-sa-expired conn=mn' in caplog.text
    assert 'reason="life_time, life_bytes or life_packets reached"' in caplog.text
    assert not ike.children and svc.engine.stats["child-expired-volume"] == 1
    assert not svc.node.engine.find_sa(child.spi_out)
    (req,) = sent  # its DELETE, under the IKE SA
    assert req.data[18] == M.ExchangeType.INFORMATIONAL
    _exchange(svc, gw, sent, clock[0])
    assert not gw.ike_sas()[0].children  # the gateway removed its half too
    assert ike.state is IkeState.ESTABLISHED


def test_sa_list_shows_the_rekey_deadlines_and_our_identity() -> None:
    """The gateway's side of an IKE SA with rekey_time on the connection and the child:
    "rekeying in" counts down from the deadlines the engine keeps (up to 10 % early at
    random, as strongSwan's rand_time), and no life_time means no "expires in"."""
    from ipsecct.commands.sa import _due

    child = dataclasses.replace(conn().children[0], rekey_time=3600.0)
    w = pair(mn_conn(), dataclasses.replace(conn(), rekey_time=14400.0, children=[child]))
    connect(w)
    (ike_r,) = w.resp.ike_sas()
    now = 100.0
    row = ike_r.summary(now)
    assert row["local_id"] == "gw.test" and row["remote_id"] == "mn.test"
    assert isinstance(row["rekey_in_s"], int) and 12860 <= row["rekey_in_s"] <= 14400
    children: list[dict[str, Any]] = row["children"]  # type: ignore[assignment]
    (c,) = children
    assert 3140 <= c["rekey_in_s"] <= 3600 and c["expires_in_s"] is None
    assert c["encap"] is False  # neither NAT nor port 4500 in this exchange
    assert _due(c) == f", rekeying in {c['rekey_in_s']} s"
    # a deadline passed reads 0 (due), none reads nothing
    assert _due(ike_r.summary(10**6)) == ", rekeying in 0 s"
    ike_r.rekey_at = None
    assert ike_r.summary(now)["rekey_in_s"] is None and _due(ike_r.summary(now)) == ""


@pytest.mark.parametrize(("patch", "child", "key"), [
    ({"proposals": 5}, {}, "proposals"),
    ({}, {"esp_proposals": [1]}, "children.net.esp_proposals"),
    ({}, {"local_ts": 5}, "children.net.local_ts"),
])  # fmt: skip
def test_a_proposal_or_selector_list_of_the_wrong_type_names_the_file_and_key_once(
    patch: dict[str, Any], child: dict[str, Any], key: str
) -> None:
    """The error said 'gw.toml: connections.rw.proposals: gw.toml: connections.rw.proposals:
    must be ...': the type check's own error wrapped again by the proposal parser's."""
    with pytest.raises(ConfigError) as ei:
        _parse(patch, child)
    assert str(ei.value) == f"gw.toml: connections.rw.{key}: must be a string or a list of strings"


@pytest.mark.parametrize("ts", ["dynamic", "%dynamic", "dynamic[udp/53]"])
def test_swanctls_dynamic_traffic_selector_says_what_to_write_instead(ts: str) -> None:
    """swanctl.conf's default ``local_ts = dynamic`` (the IKE address, or the virtual IP)
    was "bad traffic selector 'dynamic'", as if misspelt."""
    with pytest.raises(ConfigError, match=r"children\.net\.local_ts: .*'dynamic'.* is not read"
                                          r" here: write the address"):  # fmt: skip
        _parse(child={"local_ts": [ts]})
