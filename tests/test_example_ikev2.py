"""``examples/ikev2`` as its README runs it: two ``ipsecct gateway run`` and one ``ipsecct node
run`` on loopback; the node connects to sg1 with IKEv2 (PSK), and ``ipsecct transfer`` moves the
IKE SA with its CHILD SA to sg2, named by the connection, then back, named by its IKE SPI. The
node follows without a new IKE_SA_INIT, and traffic passes both ways after each move.

Ports and socket paths of the example are replaced by free ones in a temporary directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.deployment import cli
from tests.helpers.example_ikev2 import ADDR, Setup
from tests.helpers.waiting import until


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def test_ikev2_example_moves_the_ike_sa_there_and_back(setup: Setup) -> None:
    for n in ("sg1", "sg2", "mn"):
        setup.start(n)
    sg1_addr = f"{ADDR['sg1']}:{setup.port[24500]}"
    sg2_addr = f"{ADDR['sg2']}:{setup.port[34500]}"
    mn_ike = setup.wait_ike("mn", lambda s: s["children"], "the MN's IKE SA with sg1")
    assert mn_ike["remote"] == sg1_addr and mn_ike["role"] == "initiator"
    ike1 = setup.wait_ike("sg1", lambda s: s["children"], "sg1's IKE SA")
    assert ike1["name"] == "rw" and ike1["remote_id"] == "mn.example"
    assert setup.ike("sg2") == []
    setup.traffic_ok("sg1", 10)
    # the CHILD SA's SPIs as the SA table and sa show / transfer write them (with 0x: digits
    # alone are decimal there)
    text = cli("sa", "list", "--config", setup.config("sg1")).stdout
    c = ike1["children"][0]
    assert f"ESP in 0x{c['spi_in']}, out 0x{c['spi_out']}" in text, text
    assert ", established " in text

    # Named by the connection: the IKE SA and its CHILD SA go to sg2.
    r = cli("transfer", "rw", "--to", "sg2", "--json", "--config", setup.config("sg1"))
    assert r.returncode == 0, (r.stdout, r.stderr, setup.log("sg1"))
    rec = json.loads(r.stdout)
    assert rec["outcome"] == "committed" and rec["tunnels"] == 1, rec
    ike2 = setup.wait_ike("sg2", lambda s: s["children"], "sg2's IKE SA")
    assert (ike2["spi_i"], ike2["spi_r"]) == (ike1["spi_i"], ike1["spi_r"])
    assert ike2["children"][0]["spi_in"] == ike1["children"][0]["spi_in"]
    assert ike2["local"] == sg2_addr
    # the SA keeps its age: established before the transfer, not at it
    assert ike2["established_s"] >= ike1["established_s"]
    setup.wait_ike("mn", lambda s: s["remote"] == sg2_addr, "the MN following sg2 (MOBIKE)")
    setup.wait("sg1", lambda st: st["sas"] == 0, "sg1 without SAs")
    assert setup.ike("sg1") == []
    setup.traffic_ok("sg2", 20)

    # Named by its IKE SPI (the responder's, as sa list shows it): back to sg1.
    r = cli("transfer", ike2["spi_r"], "--to", "sg1", "--json", "--config", setup.config("sg2"))
    assert r.returncode == 0, (r.stdout, r.stderr, setup.log("sg2"))
    assert json.loads(r.stdout)["outcome"] == "committed"
    setup.wait_ike("mn", lambda s: s["remote"] == sg1_addr, "the MN following sg1 again")
    setup.wait_ike("sg1", lambda s: s["children"], "sg1's IKE SA back")
    setup.traffic_ok("sg1", 30)

    # Never re-negotiated: one IKE_SA_INIT from the MN, no replay or ICV drop anywhere.
    mn = setup.status("mn")
    assert mn["ike"]["counters"]["ike-sa-init-sent"] == 1, mn["ike"]
    for n in ("mn", "sg1", "sg2"):
        drops = setup.status(n)["counters"]["drops"]
        assert drops["replay"] == 0 and drops["icv"] == 0, (n, drops)

    # What names nothing: one line, exit status 2.
    for what in ("nosuch", "0x0123456789abcdef", "0x77777777"):
        r = cli("transfer", what, "--to", "sg2", "--config", setup.config("sg1"))
        assert r.returncode == 2, (what, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("why", ["name", "remote.id"])
def test_a_target_without_the_connection_refuses_the_ike_sa_and_its_child_sas(
    setup: Setup, why: str
) -> None:
    """sg2's connection has another name, or admits another peer identity: it could not take
    the IKE SA, so it refuses its CHILD SA before the commit (the transfer's UNIT CDB names the
    connection and carries the peer's identity), and sg1 keeps both and goes on serving;
    before, sg2 took the CHILD SA and dropped the IKE SA after the commit (or, for the
    identity, took an IKE SA its own policy does not admit)."""
    f = setup.dir / "sg2.toml"
    if why == "name":
        f.write_text(f.read_text().replace("[connections.rw]", "[connections.other]")
                     .replace("[secrets.ike-rw]", "[secrets.ike-other]"))  # fmt: skip
        reason = "no connection 'rw' here"
    else:
        f.write_text(f.read_text().replace('remote.id = "%any"', 'remote.id = "someone.else"'))
        reason = "is not remote.id of 'rw' here"
    for n in ("sg1", "sg2", "mn"):
        setup.start(n)
    setup.wait_ike("sg1", lambda s: s["children"], "sg1's IKE SA")
    setup.traffic_ok("sg1", 10)
    r = cli("transfer", "rw", "--to", "sg2", "--json", "--config", setup.config("sg1"))
    assert r.returncode == 1, (r.stdout, r.stderr)
    rec = json.loads(r.stdout)
    assert rec["outcome"] == "refused" and rec["accepted"] == 0, rec
    assert reason in setup.log("sg2")
    (ike,) = setup.ike("sg1")
    assert ike["children"] and setup.ike("sg2") == []
    assert setup.status("sg2")["sas"] == 0
    setup.traffic_ok("sg1", 20)
    assert setup.ike("mn")[0]["remote"] == f"{ADDR['sg1']}:{setup.port[24500]}"


def _pubkey_example(d: Path) -> tuple[int, int]:
    """The example's three configurations with certificates instead of the PSK (a CA, a
    gateway certificate for gw.example shared by sg1 and sg2, the MN's for mn.example)
    and, at sg2 only, remote.crls with a list of the CA that names the MN's certificate.
    (the MN's serial, the other serial the list names)."""
    import datetime as dt
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example CA")])

    def cert(name: str, key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(ca_name).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(days=1))
             .not_valid_after(now + dt.timedelta(days=3))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]),
                                critical=False)
        return b.sign(ca_key, hashes.SHA256())  # fmt: skip

    pem = serialization.Encoding.PEM
    d = d / "ca"
    d.mkdir()
    (d / "ca.pem").write_bytes(cert("example CA", ca_key, True).public_bytes(pem))
    serials = []
    for name in ("gw.example", "mn.example", "other.example"):
        key = ec.generate_private_key(ec.SECP256R1())
        c = cert(name, key, False)
        serials.append(c.serial_number)
        (d / f"{name}.pem").write_bytes(c.public_bytes(pem))
        fd = os.open(d / f"{name}.key", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip
        os.close(fd)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca_name)
         .last_update(now - dt.timedelta(hours=1)).next_update(now + dt.timedelta(days=7)))
    for serial in serials[1:]:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(now - dt.timedelta(minutes=5)).build())
    (d / "ca.crl").write_bytes(b.sign(ca_key, hashes.SHA256()).public_bytes(pem))
    for node, me in (("sg1", "gw.example"), ("sg2", "gw.example"), ("mn", "mn.example")):
        f = d.parent / f"{node}.toml"
        crls = f'\nremote.crls = ["{d}/ca.crl"]' if node == "sg2" else ""
        f.write_text(f.read_text()
                     .replace('local.auth = "psk"', 'local.auth = "pubkey"\n'
                              f'local.certs = ["{d}/{me}.pem"]')
                     .replace('remote.auth = "psk"', 'remote.auth = "pubkey"\n'
                              f'remote.cacerts = ["{d}/ca.pem"]{crls}')
                     + f'\n[secrets.private-me]\nfile = "{d}/{me}.key"\n')  # fmt: skip
    return serials[1], serials[2]


def test_a_target_whose_crl_revokes_the_peers_certificate_refuses_its_ike_sa(
    setup: Setup,
) -> None:
    """The example with certificates; sg2's remote.crls names the MN's certificate (sg1 has
    no lists). The transfer's UNIT CDB carries the MN's certificate serial with its
    issuer: sg2 refuses the IKE SA before the commit, and sg1 keeps it and its CHILD SA,
    and goes on serving; before, sg2 took an IKE SA its own lists revoke."""
    serial, _ = _pubkey_example(setup.dir)
    for n in ("sg1", "sg2", "mn"):
        setup.start(n)
    ike = setup.wait_ike("sg1", lambda s: s["children"], "sg1's IKE SA")
    assert ike["remote_id"] == "mn.example"
    setup.traffic_ok("sg1", 10)
    r = cli("transfer", "rw", "--to", "sg2", "--json", "--config", setup.config("sg1"))
    assert r.returncode == 1, (r.stdout, r.stderr)
    rec = json.loads(r.stdout)
    assert rec["outcome"] == "refused" and rec["accepted"] == 0, rec
    assert f"peer's certificate (serial {serial:x}) is revoked by remote.crls of 'rw' here" \
        in setup.log("sg2"), setup.log("sg2")
    (ike,) = setup.ike("sg1")
    assert ike["children"] and setup.ike("sg2") == []
    assert setup.status("sg2")["sas"] == 0
    setup.traffic_ok("sg1", 20)


def test_a_client_with_the_wrong_key_is_a_warning_at_the_gateway(setup: Setup) -> None:
    """An operator who runs the gateway at ``[log] level = "warning"`` sees a client refused
    for its pre-shared key, as one refused for its proposals (``ike-no-proposal-chosen``, a
    WARNING; charon logs both at its default level): the responder logged
    ``ike-auth-failed`` at INFO (the initiator at WARNING), so such a gateway said nothing
    while its client got AUTHENTICATION_FAILED (the node of examples/ikev2 given another
    key, 2026-12-03). One line a failure, and never a key."""
    wrong = "0x" + "11" * 32
    (setup.dir / "keys" / "mn.psk").write_text(wrong + "\n")
    os.chmod(setup.dir / "keys" / "mn.psk", 0o600)
    mn, sg1 = setup.dir / "mn.toml", setup.dir / "sg1.toml"
    mn.write_text(mn.read_text().replace('file = "keys/ike.psk"', 'file = "keys/mn.psk"'))
    sg1.write_text(sg1.read_text().replace('level = "debug"', 'level = "warning"'))
    setup.start("sg1")
    setup.start("mn")
    setup.wait("sg1", lambda st: st["ike"]["counters"].get("auth-failed", 0) >= 1,
               "sg1 to refuse the MN's key")  # fmt: skip
    until(lambda: "event=ike-auth-failed" in setup.log("sg1"), "sg1's ike-auth-failed line")
    # (one line per failure: the node tries again, 1 s later, then doubling)
    line = next(ln for ln in setup.log("sg1").splitlines() if "event=ike-auth-failed" in ln)
    assert " WARNING " in line and 'reason="pre-shared key does not match"' in line, line
    assert "id=mn.example" in line, line
    log = setup.log("sg1")
    assert wrong[2:] not in log and (setup.dir / "keys" / "ike.psk").read_text()[2:66] not in log
