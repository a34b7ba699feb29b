"""Pre-shared keys per peer identity, chosen at IKE_AUTH as charon chooses them: swanctl's
``[secrets.ike-*]`` with one or more ids (``id``, ``id-1``, ``id-2``, ...), the best match of
the peer's identity (then of ours) wins, one road-warrior connection (``remote.id = %any``)
serves clients that each have their own key."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from ipsecct.errors import ConfigError, IkeContextError
from ipsecct.gateway import config
from ipsecct.ikev2 import message as M
from ipsecct.ikev2.config import Connection, Identity, SharedKey, parse_connections, select_psk
from ipsecct.ikev2.engine import ChildUp, ConnectFailed, IkeEngine, IkeUp
from tests.helpers.ikev2_engines import Wire, connect, mn_conn

KEY_A = b"alice's own pre-shared key"
KEY_B = b"bob's own pre-shared key"
KEY_GW = b"the gateway's key for everyone"

RW: dict[str, Any] = {
    "version": 2,
    "local_addrs": ["192.0.2.1"],
    "remote_addrs": "%any",
    "local": {"auth": "psk", "id": "gw.test"},
    "remote": {"auth": "psk", "id": "%any"},
    "children": {"net": {"local_ts": ["10.1.0.0/16"], "remote_ts": "10.2.0.0/16"}},
}


def ident(text: str, initiator: bool = True) -> M.IDPayload:
    return Identity(text).payload(initiator)


def k(name: str, *ids: str) -> SharedKey:
    return SharedKey(name, ids, f"key of {name}".encode())


def test_the_secret_naming_the_peer_best_wins_then_ours_then_the_last_written() -> None:
    """charon's order: the peer's identity matched exactly beats %any (or no id), which beats
    a secret that names only us; between equal peer matches ours decides; between equals
    the last written (charon's: it keeps secrets newest first). A secret naming neither side
    is never chosen."""
    anyone, gw_only, alice, both = k("any"), k("gw", "gw.test"), k("a", "a.test"), k(
        "both", "gw.test", "a.test")  # fmt: skip
    gw, a, b = ident("gw.test", False), ident("a.test"), ident("b.test")
    assert select_psk([anyone, gw_only, alice, both], gw, a) is both  # both exact
    assert select_psk([anyone, gw_only, both, alice], gw, a) is both
    assert select_psk([anyone, gw_only, alice], gw, a) is alice  # the peer's beats ours
    assert select_psk([gw_only, anyone], gw, b) is anyone  # %any for the peer beats none
    assert select_psk([gw_only, alice], gw, b) is gw_only  # ours only
    assert select_psk([alice, k("%any", "%any")], gw, b).name == "%any"  # type: ignore[union-attr]
    first, second = k("1", "gw.test", "c.test"), k("2", "gw.test", "d.test")
    assert select_psk([first, second], gw, b) is second  # equals: the last written
    assert select_psk([second, first], gw, b) is first
    assert select_psk([alice, anyone, k("any2")], gw, a) is alice  # (a better one stays)
    assert select_psk([alice, k("c", "c.test")], gw, b) is None  # names neither
    assert select_psk([alice], None, None) is None and select_psk([anyone], None, None) is anyone
    # several ids in one secret: any of them names the side; an address is compared as one
    many = k("many", "x.test", "a.test", "198.51.100.7", "c@example.test")
    assert select_psk([many], None, a) is many
    assert select_psk([many], None, ident("198.51.100.7")) is many
    assert select_psk([many], None, ident("c@example.test")) is many
    assert select_psk([many], None, ident("example.test")) is None
    assert "key of" not in repr(many) and "key of" not in repr([many])
    # a wildcard (strongSwan's leading *) is between an exact id and anyone's
    domain, users = k("dom", "*.example.test"), k("users", "*@example.test")
    assert select_psk([anyone, users, many], gw, ident("c@example.test")) is many
    assert select_psk([anyone, users], gw, ident("d@example.test")) is users
    assert select_psk([anyone, users], gw, ident("d@other.test")) is anyone
    assert select_psk([users, domain], gw, ident("vpn.example.test")) is domain
    assert select_psk([users, domain], gw, ident("example.test")) is None


def _write(d: Path, name: str, text: str) -> None:
    fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def test_secrets_take_swanctls_id_suffixes_and_a_roadwarrior_loads_with_client_keys_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``id``, ``id-1``, ``id-2``, ``idfoo`` (swanctl's ``id<suffix>``; each a string or a
    list) all name the secret's owners; a ``remote.id = %any`` PSK connection loads with
    secrets that name its clients only (none names the gateway): the initiator's key is not
    known, the responder's is chosen per client; the keys are in no repr. A DN id (which
    charon would match) loads with a WARNING: it names no PSK here."""
    _write(tmp_path, "a.psk", "alice-key\n")
    _write(tmp_path, "b.psk", "0x" + KEY_B.hex())
    monkeypatch.setenv("ICT_TEST_PSK_C", "carol-key")
    data: dict[str, Any] = {
        "connections": {"rw": RW},
        "secrets": {
            "ike-a": {"id": "a.test", "file": "a.psk"},
            "ike-b": {"id-1": "b.test", "id-2": ["b2.test", "b3.test"], "idfoo": "b4.test",
                      "file": "b.psk"},
            "ike-c": {"id-x": "c@example.test", "env": "ICT_TEST_PSK_C"},
            "ike-any": {"file": "a.psk"},
        },
    }  # fmt: skip
    path = str(tmp_path / "gw.toml")
    keys = config.load_secrets(data, path)
    assert [(s.name, s.ids) for s in keys] == [
        ("ike-a", ("a.test",)), ("ike-b", ("b.test", "b2.test", "b3.test", "b4.test")),
        ("ike-c", ("c@example.test",)), ("ike-any", ())]  # fmt: skip
    assert keys[1].key == KEY_B and keys[2].key == b"carol-key"
    del data["secrets"]["ike-any"]
    (c,) = config.load_connections(data, path)
    assert c.psk == b"" and len(c.shared_keys) == 3
    assert c.psk_for(ident("gw.test", False), ident("b3.test")) == KEY_B
    assert c.psk_for(ident("gw.test", False), ident("a.test")) == b"alice-key"
    assert c.psk_for(ident("gw.test", False), ident("d.test")) is None
    assert not any(s in repr(c) + repr(keys) for s in ("alice-key", "carol-key", "bob's"))
    with caplog.at_level(logging.WARNING):
        config.load_secrets({"secrets": {"ike-dn": {"id": ["CN=moon, O=x", "a.test"],
                                                    "file": "a.psk"}}}, path)  # fmt: skip
    assert ('event=config-secret-id-unused config=' + path + ' secret=ike-dn id="CN=moon, '
            'O=x" reason="a distinguished name names no pre-shared key here"') in caplog.text
    assert "alice-key" not in caplog.text
    for bad, why in ((("secret", "x"), r"secrets\.ike-a\.secret: never inline"),
                     (("secret-1", "x"), r"secrets\.ike-a\.secret-1: never inline"),
                     (("id-2", 5), r"secrets\.ike-a\.id-2: must be a string or a list"),
                     (("key", "x"), r"secrets\.ike-a\.key: unknown key")):  # fmt: skip
        d2 = {"secrets": {"ike-a": {"id": "a.test", "file": "a.psk", bad[0]: bad[1]}}}
        with pytest.raises(ConfigError, match=why):
            config.load_secrets(d2, path)


def _gateway(keys: list[SharedKey], **patch: Any) -> IkeEngine:
    (c,) = parse_connections({"connections": {"rw": {**RW, **patch}}}, "gw.toml", keys)
    return IkeEngine([c])


def _client(wire_gw: IkeEngine, ident_: str, key: bytes) -> Wire:
    w = Wire(IkeEngine([mn_conn(local_id=ident_, remote_id="gw.test", psk=key)]), wire_gw)
    connect(w)
    return w


def test_one_roadwarrior_connection_serves_clients_with_keys_of_their_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Responder: the key is chosen from the client's IDi before its AUTH is checked, and the
    gateway signs its own AUTH with it. Alice and Bob each connect with their own key; Bob
    claiming Alice's identity with his key is refused (only the key chosen for the claimed
    identity is tried, not every key); Carol, whom no secret names, is refused with
    AUTHENTICATION_FAILED, counted (auth-psk-unknown) and logged without any key."""
    gw = _gateway([SharedKey("ike-a", ("a.test",), KEY_A),
                   SharedKey("ike-b", ("gw.test", "b.test"), KEY_B)])  # fmt: skip
    assert gw.connections[0].psk == KEY_B  # (the one naming local.id: an initiator's)
    caplog.set_level(logging.INFO)
    for who, key in (("a.test", KEY_A), ("b.test", KEY_B)):
        w = _client(gw, who, key)
        assert w.of("i", IkeUp), who
        assert w.of("i", ChildUp), who
    assert sorted(s.peer_id for s in gw.ike_sas()) == ["a.test", "b.test"]
    assert gw.stats["auth-failed"] == 0
    w = _client(gw, "a.test", KEY_B)  # Bob, as Alice
    assert not w.of("i", IkeUp) and w.of("i", ConnectFailed)
    assert gw.stats["auth-failed"] == 1 and gw.stats["auth-psk-unknown"] == 0
    # Carol: the only secret naming the gateway is Bob's (id gw.test): she gets it, and fails
    w = _client(gw, "c.test", b"carol's key")
    assert gw.stats["auth-failed"] == 2 and gw.stats["auth-psk-unknown"] == 0
    # without a secret naming the gateway, no secret names Carol: refused before any check
    gw2 = _gateway([SharedKey("ike-a", ("a.test",), KEY_A),
                    SharedKey("ike-b", ("b.test",), KEY_B)])  # fmt: skip
    assert gw2.connections[0].psk == b""
    caplog.clear()
    w = _client(gw2, "c.test", b"carol's key")
    (failed,) = w.of("i", ConnectFailed)
    assert "AUTHENTICATION_FAILED" in failed.reason
    assert gw2.stats["auth-failed"] == 1 and gw2.stats["auth-psk-unknown"] == 1
    (line,) = [r.getMessage() for r in caplog.records if "ike-auth-failed" in r.getMessage()
               and r.name.startswith("ipsecct.ikev2")]  # fmt: skip
    assert "id=c.test" in line and 'reason="no pre-shared key for this identity"' in line
    logs = caplog.text
    assert not any(s.decode() in logs or s.hex() in logs
                   for s in (KEY_A, KEY_B, b"carol's key"))  # fmt: skip
    assert _client(gw2, "b.test", KEY_B).of("i", IkeUp)  # and Bob still connects


def test_the_initiator_chooses_by_local_and_remote_id_and_checks_the_responders_key() -> None:
    """Initiator: its AUTH with the key of (local.id, remote.id), the responder's AUTH
    checked with the key of (local.id, the responder's IDr). A node whose secrets name
    neither identity does not start IKE_AUTH: ConnectFailed, counted, nothing sent."""
    gw = _gateway([SharedKey("ike-a", ("gw.test", "a.test"), KEY_A)])
    mn = mn_conn(local_id="a.test", remote_id="gw.test", psk=b"")
    keys = (SharedKey("ike-x", ("gw.test",), b"a key for another client"),
            SharedKey("ike-a", ("a.test", "gw.test"), KEY_A))  # fmt: skip
    w = Wire(IkeEngine([dataclasses.replace(mn, shared_keys=keys)]), gw)
    connect(w)
    assert w.of("i", IkeUp) and w.of("r", IkeUp)
    node = IkeEngine([dataclasses.replace(mn, shared_keys=(SharedKey("x", ("x.test",), b"x"),))])
    w = Wire(node, gw)
    connect(w)
    (failed,) = w.of("i", ConnectFailed)
    assert failed.reason == "no pre-shared key for local.id and remote.id"
    assert node.stats["auth-psk-unknown"] == 1 and not node.ike_sas()
    assert len(w.sent) == 2  # IKE_SA_INIT and its answer: no IKE_AUTH


def test_an_ike_sa_moved_to_a_gateway_works_there_whatever_key_its_secret_holds() -> None:
    """After IKE_AUTH the pre-shared key is not used (no re-authentication): an IKE SA made
    with Alice's own key moves to a gateway whose connection has no load-time key and whose
    secret for Alice holds another key, and goes on there: a liveness check each way and a
    CHILD SA rekey. A gateway with no secret for Alice (nor one naming its local.id)
    refuses it, as it would refuse her IKE_AUTH."""
    sg1 = _gateway([SharedKey("ike-a", ("a.test",), KEY_A)])
    w = _client(sg1, "a.test", KEY_A)
    (old,) = sg1.ike_sas()
    cdbs = sg1.export_ike(old, 1.0)
    refusing = _gateway([SharedKey("ike-z", ("z.test",), b"zed's key")])
    with pytest.raises(IkeContextError, match=r"^no \[secrets.ike-\*\] here names peer "
                       r"identity 'a.test' or local.id of 'rw'$"):  # fmt: skip
        refusing.import_ike(cdbs, 1.0)
    assert _gateway([SharedKey("ike-gw", ("gw.test",), b"x")]).import_ike(cdbs, 1.0)
    sg2 = _gateway([SharedKey("ike-z", ("z.test",), b"zed's key"),
                    SharedKey("ike-a", ("a.test",), b"not the key Alice used")])  # fmt: skip
    assert sg2.connections[0].psk == b""
    new = sg2.import_ike(cdbs, 1.0)
    assert new.peer_id == "a.test"
    w2 = Wire(w.ini, sg2)
    (ii,) = w.ini.ike_sas()
    w2.deliver(w.ini.liveness(ii, 2.0), "i", 2.0)
    w2.deliver(sg2.liveness(new, 3.0), "r", 3.0)
    assert sg2.stats["liveness-answered"] == 1 and w.ini.stats["liveness-answered"] == 1
    w2.deliver(w.ini.rekey_child(ii, ii.children[0], 4.0), "i", 4.0)
    assert sg2.stats["child-sa-rekeyed"] == 1 and sg2.stats["auth-failed"] == 0


def test_parse_connections_still_takes_a_mapping_of_one_identity_to_its_key() -> None:
    (c,) = parse_connections({"connections": {"rw": RW}}, "gw.toml", {"gw.test": KEY_GW})
    assert c.psk == KEY_GW and [s.ids for s in c.shared_keys] == [("gw.test",)]
    assert isinstance(c, Connection)


@dataclasses.dataclass
class _SentAs(Identity):
    """A client identity sent with an ID type of our choosing (a hostile client's IDi)."""

    id_type: int = M.IdType.FQDN

    def __post_init__(self) -> None:  # (whatever its text reads as)
        self.kind, self.octets = self.id_type, self.text.encode()

    def payload(self, initiator: bool) -> M.IDPayload:
        if self.id_type in (M.IdType.IPV4_ADDR, M.IdType.IPV6_ADDR):
            return M.IDPayload(initiator, self.id_type, ipaddress.ip_address(self.text).packed)
        return M.IDPayload(initiator, self.id_type, self.text.encode())


def test_an_identity_whose_text_names_another_type_is_refused_not_taken_for_that_other() -> None:
    """The peer's identity is kept, compared (unique, INITIAL_CONTACT, the per-identity bound)
    and given pool leases by its text. With a key for anyone, a client sending Alice's
    e-mail address as an FQDN or a KEY_ID (or an address as an FQDN, a DN as an FQDN) was
    not given Alice's key (not her ID type) but the anyone key, and was then Alice by text:
    its INITIAL_CONTACT took her IKE SA down. Such an IDi, whose text would name an identity
    of another type, is refused with AUTHENTICATION_FAILED, counted; Alice stays up. A name
    that is not printable is shown and kept in hex (``0x...``): an FQDN so is taken, a
    printable FQDN reading as such a hex form is not (nor an e-mail address in hex)."""
    gw = _gateway([SharedKey("ike-a", ("a@example.test", "198.51.100.7"), KEY_A),
                   SharedKey("ike-any", (), KEY_GW)])  # fmt: skip
    w = _client(gw, "a@example.test", KEY_A)
    assert w.of("i", IkeUp)
    (alice,) = gw.ike_sas()
    assert alice.peer_id == "a@example.test"
    t = M.IdType
    refused = (("a@example.test", t.FQDN), ("198.51.100.7", t.FQDN),
               ("CN=a, O=example", t.FQDN), ("%any", t.FQDN), ("", t.FQDN),
               ("a\n@example.test", t.RFC822_ADDR), ("0x610a2e74657374", t.FQDN),
               # strongSwan's syntax: what these read as is another identity (or anyone)
               ("%ANY", t.FQDN), ("*", t.FQDN), ("0X0A", t.FQDN), ("@a.test", t.FQDN),
               ("fqdn:a.test", t.FQDN), ("email:a@example.test", t.RFC822_ADDR),
               ("@@a@example.test", t.RFC822_ADDR), ("a:b", t.FQDN), ("@#0a", t.FQDN),
               ("0.0.0.0", t.FQDN), ("10.0.0.0/8", t.FQDN))
    for text, typ in refused:
        mallory = mn_conn(local_id="m.test", remote_id="gw.test", psk=KEY_GW)
        mallory.local_id = _SentAs(text, typ)
        w = Wire(IkeEngine([mallory]), gw)
        connect(w)
        assert not w.of("i", IkeUp) and w.of("i", ConnectFailed), (text, typ)
        assert [s.peer_id for s in gw.ike_sas()] == ["a@example.test"], (text, typ)
    assert gw.stats["auth-id-ambiguous"] == len(refused) == gw.stats["auth-failed"]
    # the anyone key still serves identities that are what they say; a KEY_ID is kept as
    # swanctl.conf writes it (@# and hex), never as the text of its octets (Alice's)
    for text, typ in (("m.test", t.FQDN), ("m@example.test", t.RFC822_ADDR),
                      ("a\n.test", t.FQDN), ("a@example.test", t.KEY_ID)):  # fmt: skip
        mallory = mn_conn(local_id="m.test", remote_id="gw.test", psk=KEY_GW)
        mallory.local_id = _SentAs(text, typ)
        w = Wire(IkeEngine([mallory]), gw)
        connect(w)
        assert w.of("i", IkeUp), text
    assert alice in gw.ike_sas()
    assert "@#" + b"a@example.test".hex() in [s.peer_id for s in gw.ike_sas()]


def test_an_empty_id_is_refused_at_load_not_read_as_no_id_which_is_anyones(
    tmp_path: Path,
) -> None:
    """A secret without ids is anyone's; ``id = ""`` (a template's empty variable), blanks or
    an empty list were dropped, leaving a key meant for one identity anyone's: refused at
    load, naming the key, as is an id that is only blanks in a list."""
    _write(tmp_path, "a.psk", "alice-key\n")
    path = str(tmp_path / "gw.toml")
    ids: dict[str, Any]
    for ids in ({"id": ""}, {"id": "  "}, {"id": []}, {"id-1": "a.test", "id-2": ["b.test", " "]}):
        data = {"secrets": {"ike-a": {**ids, "file": "a.psk"}}}
        with pytest.raises(ConfigError, match=r"secrets\.ike-a\.id(-2)?: .*empty.*%any"):
            config.load_secrets(data, path)
    (k_,) = config.load_secrets({"secrets": {"ike-a": {"id": " a.test ", "file": "a.psk"}}},
                                path)  # fmt: skip
    assert k_.ids == ("a.test",)


def test_an_identity_named_by_two_secrets_loads_with_a_warning_naming_both(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's key replaced by adding a secret after the old one: both name the client,
    the last written wins (as in charon) and the old key is never used for it, silently.
    Such an id (the same identity however written: an IPv6 address either way) loads with
    a WARNING naming the
    id and both secrets (event=config-secret-id-twice), no key; anyone's secrets do not, nor
    a connection's local.id that each secret names with its client."""
    _write(tmp_path, "a.psk", "old-alice-key\n")
    _write(tmp_path, "b.psk", "new-alice-key\n")
    path = str(tmp_path / "gw.toml")
    data = {"connections": {"rw": RW},
            "secrets": {"ike-old": {"id": ["a.test", "2001:db8::1", "gw.test"], "file": "a.psk"},
                        "ike-any": {"file": "a.psk"}, "ike-any2": {"id": "%any", "file": "a.psk"},
                        "ike-new": {"id-1": "a.test", "id-2": "2001:db8:0::1", "id-3": "gw.test",
                                    "file": "b.psk"}}}  # fmt: skip
    with caplog.at_level(logging.WARNING):
        keys = config.load_secrets(data, path)
    assert len(keys) == 4
    lines = [r.getMessage() for r in caplog.records if "config-secret-id-twice" in r.getMessage()]
    assert len(lines) == 2, lines
    assert all("secret=ike-new" in x and "first=ike-old" in x for x in lines)
    assert any('id="a.test"' in x for x in lines) and any("2001:db8" in x for x in lines)
    assert "alice-key" not in caplog.text


@pytest.mark.parametrize("spelling", ["%any6", "0.0.0.0", "*", "::", "0::0"])
def test_strongswans_other_spellings_of_anyone_name_anyone(spelling: str) -> None:
    """strongSwan reads an identity written "", %any, %any6, 0.0.0.0, *, :: or 0::0 as anyone
    (ID_ANY), in a secret's id and in remote.id. ipsecct took all but the first two as an
    identity of that text: a secret with id = "*" named only a peer called "*", so a client
    holding that key was given another (the one naming the gateway's local.id: a weaker
    match for the peer than strongSwan's anyone) and refused, and remote.id = "*" admitted
    nobody. Now they are anyone's; a peer naming itself so is refused, as with %any."""
    assert Identity(spelling).any
    gw_only, anyone = k("gw", "gw.test"), k("any", spelling)
    assert select_psk([gw_only, anyone], ident("gw.test", False), ident("b.test")) is anyone
    gw = _gateway([SharedKey("ike-gw", ("gw.test",), KEY_A),
                   SharedKey("ike-any", (spelling,), KEY_GW)],
                  remote={"auth": "psk", "id": spelling})  # fmt: skip
    assert _client(gw, "b.test", KEY_GW).of("i", IkeUp)
    assert [s.peer_id for s in gw.ike_sas()] == ["b.test"]
    t = M.IdType
    typ = (t.IPV4_ADDR if spelling == "0.0.0.0" else t.IPV6_ADDR if ":" in spelling
           else t.FQDN)  # fmt: skip
    mallory = mn_conn(local_id="m.test", remote_id="gw.test", psk=KEY_GW)
    mallory.local_id = _SentAs(spelling, typ)
    w = Wire(IkeEngine([mallory]), gw)
    connect(w)
    assert not w.of("i", IkeUp) and gw.stats["auth-id-ambiguous"] == 1
