"""IKE identities written as swanctl.conf writes them (strongSwan 5.9.8's
identification_create_from_string) and compared as charon compares them (identification.c:
a name or an e-mail address case-insensitively, a leading ``*`` as a wildcard). The
strongSwan client's side: test_ikev2_strongswan.py."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipsecct.errors import ConfigError, IdentityError, IkeContextError
from ipsecct.gateway import config
from ipsecct.ikev2 import message as M
from ipsecct.ikev2.config import (
    ID_ANY,
    MATCH_ANY,
    MATCH_NONE,
    MATCH_PERFECT,
    MATCH_WILDCARD,
    Identity,
    SharedKey,
    canonical_peer_id,
    parse_connections,
    peer_id_text,
    says_what_it_is,
)
from ipsecct.ikev2.engine import ConnectFailed, IkeEngine, IkeUp
from ipsecct.ikev2.pool import Pool
from tests.helpers.ikev2_engines import Wire, connect, mn_conn

T = M.IdType
KEY = b"the key of the test"

# (text, ID type, octets) as strongSwan reads the text
FORMS: list[tuple[str, int, bytes]] = [
    ("gw.example", T.FQDN, b"gw.example"),
    ("@gw.example", T.FQDN, b"gw.example"),
    ("fqdn:gw.example", T.FQDN, b"gw.example"),
    ("FQDN:gw.example", T.FQDN, b"gw.example"),  # (prefixes in any case)
    ("dns:gw.example", T.FQDN, b"gw.example"),
    ("fqdn:#6777", T.FQDN, b"gw"),
    ("gw-1.example", T.FQDN, b"gw-1.example"),
    ("10.0.0.1-x", T.FQDN, b"10.0.0.1-x"),
    ("*.example.org", T.FQDN, b"*.example.org"),
    ("@*.example.org", T.FQDN, b"*.example.org"),
    ("alice@example.org", T.RFC822_ADDR, b"alice@example.org"),
    ("@@alice@example.org", T.RFC822_ADDR, b"alice@example.org"),
    ("@@alice", T.RFC822_ADDR, b"alice"),
    ("email:alice@example.org", T.RFC822_ADDR, b"alice@example.org"),
    ("rfc822:alice@example.org", T.RFC822_ADDR, b"alice@example.org"),
    ("userfqdn:alice@example.org", T.RFC822_ADDR, b"alice@example.org"),
    ("email:a=b@example.org", T.RFC822_ADDR, b"a=b@example.org"),
    ("*@example.org", T.RFC822_ADDR, b"*@example.org"),
    ("192.0.2.1", T.IPV4_ADDR, bytes([192, 0, 2, 1])),
    ("ipv4:#c0000201", T.IPV4_ADDR, bytes([192, 0, 2, 1])),
    ("2001:db8::1", T.IPV6_ADDR, bytes.fromhex("20010db8" + "0" * 22 + "01")),
    ("ipv6:#20010db8" + "0" * 22 + "01", T.IPV6_ADDR, bytes.fromhex("20010db8" + "0" * 22 + "01")),
    ("@#0a0B", T.KEY_ID, b"\x0a\x0b"),
    ("keyid:#0a0b", T.KEY_ID, b"\x0a\x0b"),
    ("keyid:Abc", T.KEY_ID, b"Abc"),
    ("gw.example:500", T.KEY_ID, b"gw.example:500"),  # a ':' and not IPv6: a KEY_ID
    ("fe80::1%eth0", T.KEY_ID, b"fe80::1%eth0"),  # (inet_pton takes no scope)
    ("01.2.3.4", T.FQDN, b"01.2.3.4"),  # (nor a leading zero)
    ("CN=gw, O=example", T.DER_ASN1_DN, b"CN=gw, O=example"),
    ("@gw=example", T.DER_ASN1_DN, b"@gw=example"),  # ('=' is looked at before '@')
] + [(a, ID_ANY, b"") for a in ("", "%any", "%any6", "*", "0.0.0.0", "::", "0::0")]


@pytest.mark.parametrize(("text", "kind", "octets"), FORMS)
def test_an_id_is_read_as_strongswan_reads_it(text: str, kind: int, octets: bytes) -> None:
    ident = Identity(text)
    assert (ident.kind, ident.octets) == (kind, octets)
    assert ident.any == (kind == ID_ANY) and ident.is_dn == (kind == T.DER_ASN1_DN)
    assert ident.wildcard == (text.lstrip("@").startswith("*.") or text.startswith("*@"))
    if kind not in (ID_ANY, T.DER_ASN1_DN):
        p = ident.payload(False)
        assert (p.id_type, p.data) == (kind, octets)  # what we send: no @, no prefix


# (text, what the refusal says)
REFUSED: list[tuple[str, str]] = [
    ("ipv4:192.0.2.1", "write the address without ipv4: .or ipv4:#c0000201"),
    ("ipv6:2001:db8::1", "write the address without ipv6:"),
    ("ipv4:#c00002", "write the address without ipv4:"),
    ("10.0.0.0/8", "a subnet as an identity is not supported here: write one address"),
    ("2001:db8::/32", "a subnet"),
    ("ipv4net:10.0.0.0/8", "a subnet"),
    ("10.0.0.1-10.0.0.9", "an address range as an identity is not supported"),
    ("ipv6range:#00", "an address range"),
    ("asn1dn:#3000", r"write the distinguished name as text \(C=CH, O=example, CN=gw\)"),
    ("asn1gn:#00", "DER_ASN1_GN is not supported here"),
    ("xmppaddr:a@example.org", "DER_ASN1_GN .xmppaddr:. is not supported"),
    ("{2}:gw.example", "a numbered ID type is not supported here: write a typed prefix"),
    ("@#zz", "after # come the octets as pairs of hex digits"),
    ("@#abc", "pairs of hex digits"),
    ("keyid:#", "pairs of hex digits"),
    ("@", "an empty identity"),
    ("@@", "an empty identity"),
    ("fqdn:", "an empty identity"),
]


@pytest.mark.parametrize(("text", "why"), REFUSED)
def test_a_form_we_cannot_honour_is_refused_saying_what_to_write(text: str, why: str) -> None:
    with pytest.raises(IdentityError, match=why) as ei:
        Identity(text)
    assert "\n" not in str(ei.value) and repr(text) in str(ei.value)


RW: dict[str, Any] = {
    "version": 2,
    "local_addrs": ["192.0.2.1"],
    "remote_addrs": "%any",
    "local": {"auth": "psk", "id": "@gw.test"},
    "remote": {"auth": "psk", "id": "%any"},
    "children": {"net": {"local_ts": ["10.1.0.0/16"], "remote_ts": "10.2.0.0/16"}},
}


def _write_psk(d: Path) -> None:
    (d / "k.psk").write_bytes(KEY)
    (d / "k.psk").chmod(0o600)


@pytest.mark.parametrize(("text", "why"), REFUSED[:6] + REFUSED[8:9] + REFUSED[11:13])
@pytest.mark.parametrize("where", ["local.id", "remote.id", "secret"])
def test_a_refused_form_is_a_load_error_naming_the_key(
    tmp_path: Path, text: str, why: str, where: str
) -> None:
    """local.id, remote.id and a secret's id (id, id-N) alike: the file, the key, the text
    and what to write instead, in one line; never read as something else."""
    _write_psk(tmp_path)
    path = str(tmp_path / "gw.toml")
    d = {**RW, "local": dict(RW["local"]), "remote": dict(RW["remote"])}
    secrets: dict[str, dict[str, Any]] = {"ike-a": {"id-1": "@gw.test", "file": "k.psk"}}
    if where == "secret":
        secrets["ike-a"]["id-2"] = ["a.test", text]
        key = r"secrets\.ike-a\.id-2"
    else:
        d[where.split(".")[0]]["id"] = text
        key = rf"connections\.rw\.{where.replace('.', '[.]')}"
    want = f"^{re.escape(path)}: {key}: {re.escape(repr(text))}: .*{why}"
    with pytest.raises(ConfigError, match=want) as ei:
        config.load_connections({"connections": {"rw": d}, "secrets": secrets}, path)
    assert "\n" not in str(ei.value)


def test_a_wildcard_local_id_is_refused_and_an_any_local_id_is_our_address() -> None:
    """A pattern names no one we could send; ``local.id = %any`` (or ``*``) is, as charon
    takes it, our address: as without local.id."""
    for lid in ("*.gw.test", "@*.gw.test", "*@gw.test"):
        with pytest.raises(ConfigError, match=r"^gw\.toml: connections\.rw\.local\.id: .* is a"
                           " pattern .remote.id and secrets take one.: local.id is the one"):
            parse_connections({"connections": {"rw": {**RW, "local": {"id": lid}}}},
                              "gw.toml", {"gw.test": KEY})  # fmt: skip
    for lid in ("%any", "*", "0.0.0.0"):
        (c,) = parse_connections({"connections": {"rw": {**RW, "local": {"id": lid}}}},
                                 "gw.toml", {"%any": KEY})  # fmt: skip
        assert c.local_id is None


def test_a_refused_id_is_one_line_and_exit_2_at_the_command_line(tmp_path: Path) -> None:
    _write_psk(tmp_path)
    p = tmp_path / "gw.toml"
    p.write_text("""name = "gw"
[outer]
address = "192.0.2.1"
[inner]
kind = "udp"
listen = "127.0.0.1:7000"
peer = "127.0.0.1:7001"
[connections.rw]
local.id = "@gw.test"
remote.id = "ipv4:198.51.100.7"
children.net.local_ts = ["10.1.0.0/16"]
children.net.remote_ts = ["10.2.0.0/16"]
[secrets.ike-rw]
id = "@gw.test"
file = "k.psk"
""")
    r = subprocess.run([sys.executable, "-m", "ipsecct", "gateway", "run", "--config", str(p)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line == (f"ipsecct: error: {p}: connections.rw.remote.id: 'ipv4:198.51.100.7': "
                    "strongSwan takes what follows ipv4: as the octets themselves: write the "
                    "address without ipv4: (or ipv4:#c0000201)")  # fmt: skip


def _p(kind: int, data: bytes) -> M.IDPayload:
    return M.IDPayload(True, kind, data)


def test_names_and_email_addresses_compare_in_any_case_as_charon_does() -> None:
    """identification.c's equals_strcasecmp and matches_string: an FQDN or RFC822 id equal
    in any case is a perfect match, a leading ``*`` takes an ending (in any case) after at
    least one character; a KEY_ID and an address are compared octet by octet."""
    gw = Identity("@gw.example")
    assert gw.match(_p(T.FQDN, b"GW.Example")) == MATCH_PERFECT
    assert gw.match(_p(T.RFC822_ADDR, b"gw.example")) == MATCH_NONE  # (another type)
    assert Identity("Alice@Example.ORG").match(_p(T.RFC822_ADDR, b"alice@example.org")) == 3
    dom, users = Identity("*.Example.org"), Identity("*@example.ORG")
    assert dom.match(_p(T.FQDN, b"VPN.example.org")) == MATCH_WILDCARD
    assert dom.match(_p(T.FQDN, b"x.example.org")) == MATCH_WILDCARD
    assert dom.match(_p(T.FQDN, b".example.org")) == MATCH_NONE  # (* takes one at least)
    assert dom.match(_p(T.FQDN, b"example.org")) == MATCH_NONE
    assert dom.match(_p(T.FQDN, b"vpn.example.org.evil")) == MATCH_NONE
    assert users.match(_p(T.RFC822_ADDR, b"Bob@EXAMPLE.org")) == MATCH_WILDCARD
    assert users.match(_p(T.FQDN, b"bob@example.org")) == MATCH_NONE
    assert Identity("%any").match(_p(T.FQDN, b"x")) == MATCH_ANY
    assert Identity("keyid:Ab").match(_p(T.KEY_ID, b"ab")) == MATCH_NONE
    assert Identity("@#4162").match(_p(T.KEY_ID, b"Ab")) == MATCH_PERFECT
    assert Identity("192.0.2.1").match(_p(T.IPV4_ADDR, bytes([192, 0, 2, 1]))) == 3
    # a secret's ids alike
    k = SharedKey("k", ("@GW.example", "*.Users.example", "@#0a"), KEY)
    assert k.match(_p(T.FQDN, b"gw.EXAMPLE")) == MATCH_PERFECT
    assert k.match(_p(T.FQDN, b"Alice.users.example")) == MATCH_WILDCARD
    assert k.match(_p(T.KEY_ID, b"\x0a")) == MATCH_PERFECT
    assert k.match(_p(T.FQDN, b"other.example")) == MATCH_NONE


NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.",
                min_size=1, max_size=30).filter(lambda s: s[0] not in ".-")


@given(NAMES, st.sampled_from(["", "@", "fqdn:", "DNS:"]), st.randoms(use_true_random=False))
def test_every_spelling_of_one_name_is_one_identity_kept_by_one_text(
    name: str, prefix: str, rnd: Any
) -> None:
    """However a name is written in the configuration and whatever its case on the wire, it
    matches perfectly, a secret naming it is chosen, and it is kept (peer_id: unique,
    leases, transfers) by one text, which reads back as the same identity."""
    ident = Identity(prefix + name)
    if ident.kind != T.FQDN:  # (a name of digits and dots: an address)
        return
    sent = "".join(c.upper() if rnd.random() < 0.5 else c.lower() for c in name)
    p = _p(T.FQDN, sent.encode())
    assert ident.match(p) == MATCH_PERFECT
    assert SharedKey("k", (prefix + name,), KEY).match(p) == MATCH_PERFECT
    assert peer_id_text(p) == peer_id_text(_p(T.FQDN, name.lower().encode()))
    if says_what_it_is(p):
        assert Identity(peer_id_text(p)).key == ident.key
        assert canonical_peer_id(sent) == peer_id_text(p)


def test_canonical_peer_id_folds_only_a_plainly_written_name_or_address() -> None:
    """A peer identity from another gateway (one that kept a name's case): a plain name or
    e-mail address is folded; anything else is as it came (never reinterpreted)."""
    assert canonical_peer_id("Alice.Example") == "alice.example"
    assert canonical_peer_id("Alice@Example.ORG") == "alice@example.org"
    assert canonical_peer_id("0x411b") == "0x611b"  # (a name that is not printable: A\x1b)
    for same in ("CN=Alice, O=X", "@Alice.example", "2001:db8::1", "@#0a", "%ANY", "0X0A",
                 "ipv4:1.2.3.4", "0x0a", "0x61", "\ufffd\x00", "A\x1b[2J.test",
                 "Ä.test"):  # fmt: skip
        assert canonical_peer_id(same) == same


def _gw(remote_id: str = "%any", *ids: str, **kw: Any) -> IkeEngine:
    d = {**RW, "remote": {"auth": "psk", "id": remote_id}, **kw}
    keys = [SharedKey("ike-a", ids or ("@gw.test",), KEY)]
    (c,) = parse_connections({"connections": {"rw": d}}, "gw.toml", keys)
    pool = Pool("p", ipaddress.ip_address("10.3.0.1"), ipaddress.ip_address("10.3.0.9"))
    return IkeEngine([dataclasses.replace(c, pools=["p"])], pools={"p": pool})


def _client(gw: IkeEngine, local_id: str, remote_id: str = "gw.test", vip: bool = False
            ) -> Wire:  # fmt: skip
    c = mn_conn(local_id=local_id, remote_id=remote_id, psk=KEY)
    if vip:
        c = dataclasses.replace(c, vips=[ipaddress.ip_address("0.0.0.0")])
    w = Wire(IkeEngine([c]), gw)
    connect(w)
    return w


def test_at_ids_and_mixed_case_authenticate_and_are_sent_plain() -> None:
    """``local.id = "@gw.test"`` goes on the wire as the FQDN gw.test (the client's
    remote.id gw.test or GW.Test takes it); the gateway's ``remote.id = "@Alice.Test"`` and
    secret ``id = "@ALICE.test"`` take the client's IDi alice.TEST; the IKE SA keeps
    alice.test. A wildcard remote.id takes a name ending so, and an initiator with one
    sends no IDr (charon: a pattern names no one)."""
    gw = _gw("@Alice.Test", "@ALICE.test")
    assert gw.connections[0].local_id is not None
    assert gw.connections[0].local_id.payload(False).data == b"gw.test"
    w = _client(gw, "alice.TEST", "GW.Test")
    assert w.of("i", IkeUp) and w.of("r", IkeUp)
    ((ini,), (resp,)) = w.ini.ike_sas(), gw.ike_sas()
    assert ini.peer_id == "gw.test" and resp.peer_id == "alice.test"
    assert resp.local_id_text() == "gw.test"  # (ipsecct sa list: as the peer sees it)
    assert _client(gw, "bob.test").of("i", ConnectFailed)  # (not remote.id)
    wild = _gw("*.users.test", "*.Users.TEST")
    assert _client(wild, "Carol.USERS.test").of("i", IkeUp)
    assert [s.peer_id for s in wild.ike_sas()] == ["carol.users.test"]
    assert _client(wild, "users.test").of("i", ConnectFailed)
    # as initiator, with a wildcard remote.id: no IDr (the gateway, local.id gw.test,
    # would find no connection for an IDr *.test), the responder's IDr taken by it
    w = _client(_gw("%any", "gw.test", "alice.test"), "alice.test", "*.TEST")
    assert w.of("i", IkeUp)
    assert w.ini.ike_sas()[0].peer_id == "gw.test"


def test_two_spellings_of_one_identity_get_one_lease_and_cannot_dodge_unique() -> None:
    """The IKE SA's peer_id is the key of unique, the per-identity bound and the pool
    leases: Alice as alice.test and as ALICE.Test is one identity (charon compares names
    in any case). unique = keep refuses her second IKE SA whatever its spelling; gone and
    back in another case she gets her own address again, not a second lease."""
    gw = _gw("%any", "gw.test", "alice.test", unique="keep")
    w1 = _client(gw, "alice.test", vip=True)
    assert w1.of("i", IkeUp)
    (first,) = gw.ike_sas()
    (addr,) = first.vips
    w2 = _client(gw, "ALICE.Test", vip=True)
    assert not w2.of("i", IkeUp) and gw.stats["unique-kept"] == 1
    (ike,) = w1.ini.ike_sas()
    w1.deliver(w1.ini.delete(ike, 1.0), "i", 1.0)
    assert not gw.ike_sas()
    w3 = _client(gw, "Alice.TEST", vip=True)
    assert w3.of("i", IkeUp)
    (again,) = gw.ike_sas()
    assert again.peer_id == "alice.test" and again.vips == [addr]
    assert gw.pools["p"].offline == {}


def test_an_ike_sa_from_a_gateway_that_kept_the_case_is_kept_folded() -> None:
    """A context (or UNIT) from a gateway that kept a name's case: imported with the
    identity folded, admitted by a remote.id naming it in another case, and one identity
    with the IKE SA of the same client here (unique = keep refuses the second)."""
    sg1 = _gw("%any", "gw.test", "alice.test")
    w = _client(sg1, "alice.test")
    (old,) = sg1.ike_sas()
    old.peer_id = "Alice.Test"  # (as an older gateway kept it)
    cdbs = sg1.export_ike(old, 1.0)
    sg2 = _gw("@ALICE.test", "gw.test", "alice.test", unique="keep")
    new = sg2.import_ike(cdbs, 1.0)
    assert new.peer_id == "alice.test"
    refusing = _gw("bob.test", "gw.test", "alice.test")
    with pytest.raises(IkeContextError, match=r"peer identity 'alice\.test' is not remote\.id"):
        refusing.import_ike(cdbs, 1.0)
    assert sg2.arrival_refusal(sg2.connections[0], "alice.test") is not None
    assert w.of("i", IkeUp)
