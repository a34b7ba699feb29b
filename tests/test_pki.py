"""The test PKI: files, modes, certificate contents, checked independently with openssl."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import stat
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ipsecct import cli
from ipsecct.errors import PkiError
from ipsecct.tools import pki

NOW = dt.datetime.now(dt.UTC)
Main = Callable[[Sequence[str] | None], int]


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch) -> Main:
    """cli.main with the pki command registered (whether or not cli.py lists it yet)."""
    if "pki" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "pki"))
    return cli.main


def test_init_writes_files_with_modes(tmp_path: Path) -> None:
    files = pki.init_pki(tmp_path / "p", ["sg1", "sg2"], NOW)
    names = sorted(p.name for p in files)
    assert names == sorted(["ca.pem", "ca.key", "sg1.pem", "sg1.key", "sg2.pem", "sg2.key"])
    for p in files:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o600 if p.suffix == ".key" else 0o644), p


def test_gateway_certificate_contents(tmp_path: Path) -> None:
    pki.init_pki(tmp_path, ["sg1"], NOW)
    ca = pki.load_certificate(tmp_path / "ca.pem")
    cert = pki.load_certificate(tmp_path / "sg1.pem")
    assert cert.issuer == ca.subject
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sg1"
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["sg1"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The private key on disk matches the certificate.
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((tmp_path / "sg1.key").read_bytes(), None)
    assert key.public_key() == pub


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@pytest.mark.parametrize("purpose", ["sslserver", "sslclient"])
def test_openssl_verifies_chain_and_purpose(tmp_path: Path, purpose: str) -> None:
    pki.init_pki(tmp_path, ["sg1", "sg2"], NOW)
    for g in ("sg1", "sg2"):
        r = subprocess.run(
            ["openssl", "verify", "-purpose", purpose, "-CAfile", tmp_path / "ca.pem",
             tmp_path / f"{g}.pem"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert r.returncode == 0, r.stdout + r.stderr
    # A certificate from another CA does not verify against this one.
    pki.init_pki(tmp_path / "other", ["sg1"], NOW)
    r = subprocess.run(
        ["openssl", "verify", "-CAfile", tmp_path / "ca.pem", tmp_path / "other" / "sg1.pem"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode != 0


def test_refuses_overwrite_without_force(tmp_path: Path) -> None:
    pki.init_pki(tmp_path, ["sg1"], NOW)
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(PkiError, match="refusing to overwrite"):
        pki.init_pki(tmp_path, ["sg1", "sg2"], NOW)
    assert (tmp_path / "ca.pem").read_bytes() == before
    assert not (tmp_path / "sg2.pem").exists()  # nothing written at all
    (tmp_path / "sg1.key").chmod(0o644)
    pki.init_pki(tmp_path, ["sg1", "sg2"], NOW, force=True)
    assert (tmp_path / "ca.pem").read_bytes() != before
    assert stat.S_IMODE((tmp_path / "sg1.key").stat().st_mode) == 0o600


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", "-x", "sg 1", "x" * 64, "ca"])
def test_bad_gateway_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(PkiError):
        pki.init_pki(tmp_path, [bad], NOW)
    assert list(tmp_path.iterdir()) == []


def test_duplicate_names(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="distinct"):
        pki.init_pki(tmp_path, ["sg1", "sg1"], NOW)


def test_issued_repr_hides_key() -> None:
    ca = pki.make_ca(NOW)
    assert "key" not in repr(ca).lower().replace("issued", "")


def test_cli_init_and_show(
    tmp_path: Path, run_cli: Main, capsys: pytest.CaptureFixture[str]
) -> None:
    main = run_cli
    d = tmp_path / "pki"
    assert main(["pki", "init", "--dir", str(d), "--gateways", "sg1,sg2"]) == 0
    out = capsys.readouterr().out
    assert str(d / "sg2.key") in out
    assert main(["pki", "show", str(d / "sg1.pem")]) == 0
    out = capsys.readouterr().out
    assert "CN=sg1" in out and "DNS:sg1" in out and "IP:127.0.0.1" in out
    assert "serverAuth" in out and "clientAuth" in out
    assert main(["pki", "show", str(d / "sg1.key")]) == 0
    out = capsys.readouterr().out
    assert "EC secp256r1" in out and "0600" in out
    assert "BEGIN" not in out  # never prints the key


def test_cli_errors_are_one_line(
    tmp_path: Path, run_cli: Main, capsys: pytest.CaptureFixture[str]
) -> None:
    main = run_cli
    d = tmp_path / "pki"
    assert main(["pki", "init", "--dir", str(d), "--gateways", "sg1"]) == 0
    capsys.readouterr()
    assert main(["pki", "init", "--dir", str(d), "--gateways", "sg1"]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and len(err.strip().splitlines()) == 1
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    assert main(["pki", "show", str(junk)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    badkey = tmp_path / "bad.key"
    badkey.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    assert main(["pki", "show", str(badkey)]) == 2
    assert main(["pki", "show", str(tmp_path / "missing.pem")]) == 2
    assert "missing.pem" in capsys.readouterr().err
