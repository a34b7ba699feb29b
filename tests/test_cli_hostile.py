"""An operator's and an attacker's pass over the command line, the configuration and the
control paths: each mistake is one line on stderr and a non-zero exit, never a traceback,
a hang or a wrong result."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ipsecct.errors import ChannelError, ConfigError
from ipsecct.gateway import config, tlschannel
from ipsecct.tools import pki

ROOT = Path(__file__).resolve().parent.parent
NOW = dt.datetime.now(dt.UTC)


Run = subprocess.CompletedProcess[str]


def ipsecct(*args: str, timeout: float = 60, stdin: str | None = None) -> Run:
    return subprocess.run([sys.executable, "-m", "ipsecct", *args], capture_output=True,
                          text=True, timeout=timeout, input=stdin)  # fmt: skip


def one_line_error(r: Run, *says: str) -> str:
    """The command failed (status 2) with one error line saying each of ``says``."""
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ipsecct: error: ")]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1, r.stderr
    for s in says:
        assert s in errors[0], (s, errors[0])
    return errors[0]


def _self_signed(cn: str, bc: x509.BasicConstraints | None) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - dt.timedelta(hours=1))
         .not_valid_after(NOW + dt.timedelta(days=30)))  # fmt: skip
    if bc is not None:
        b = b.add_extension(bc, critical=True)
    return (b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM),
            pki.key_pem(key))  # fmt: skip


@pytest.fixture(scope="module")
def pkidir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init_pki(d, ["sg1", "sg2"], NOW)
    leaf, _ = _self_signed("pinned", x509.BasicConstraints(ca=False, path_length=None))
    (d / "selfsigned-leaf.pem").write_bytes(leaf)
    (d / "no-bc.pem").write_bytes(_self_signed("old", None)[0])
    (d / "ca-then-leaf.pem").write_bytes((d / "ca.pem").read_bytes() + (d / "sg2.pem").read_bytes())
    return d


NOT_CA = {
    "a gateway's certificate": ("sg2.pem", "'CN=sg2,O=ipsecct test PKI'", "CA:FALSE"),
    "a self-signed leaf": ("selfsigned-leaf.pem", "'CN=pinned'", "CA:FALSE"),
    "no basicConstraints": ("no-bc.pem", "'CN=old'", "no basicConstraints"),
    "the CA and a leaf": ("ca-then-leaf.pem", "'CN=sg2,O=ipsecct test PKI'", "CA:FALSE"),
}


@pytest.mark.parametrize("what", list(NOT_CA), ids=list(NOT_CA))
def test_a_transfer_ca_that_is_not_a_ca_is_refused_naming_the_file(
    what: str, pkidir: Path
) -> None:
    """transfer.ca holding a leaf was taken: a CA-issued one made every handshake between
    the gateways fail later ("unable to get local issuer certificate"), a self-signed one
    was trusted as a pinned peer. As swanctl ("ca certificate lacks CA basic constraint,
    rejected"): a CA file holds CA certificates only."""
    name, subject, why = NOT_CA[what]
    for make in (tlschannel.server_context, tlschannel.client_context):
        with pytest.raises(ChannelError) as ei:
            make(pkidir / "sg1.pem", pkidir / "sg1.key", pkidir / name)
        msg = str(ei.value)
        assert f"the CA file {pkidir / name}: {subject} is not a CA certificate" in msg, msg
        assert why in msg, msg
    tlschannel.server_context(pkidir / "sg1.pem", pkidir / "sg1.key", pkidir / "ca.pem")


def test_gateway_run_with_a_leaf_as_transfer_ca_is_one_line_and_exit_2(
    pkidir: Path, tmp_path: Path
) -> None:
    ex = tmp_path / "ex"
    shutil.copytree(ROOT / "examples" / "transfer", ex)
    shutil.copytree(pkidir, ex / "pki")
    for k in (ex / "keys").iterdir():
        os.chmod(k, 0o600)
    text = (ex / "sg1.toml").read_text()
    text = text.replace('ca = "pki/ca.pem"', 'ca = "pki/sg2.pem"')
    text = text.replace('socket = "xfer-sg1.sock"', f'socket = "{tmp_path}/sg1.sock"')
    text = text.replace('dir = "state/sg1"', f'dir = "{tmp_path}/state"')
    (ex / "sg1.toml").write_text(text)
    r = ipsecct("gateway", "run", "-c", str(ex / "sg1.toml"), "--log-level", "error")
    one_line_error(r, f"{ex}/pki/sg2.pem", "is not a CA certificate")


IKE_GW = """name = "gw"
[outer]
address = "192.0.2.1"
[inner]
kind = "udp"
listen = "127.0.0.1:7000"
peer = "127.0.0.1:7001"
[connections.rw]
local.auth = "pubkey"
local.certs = ["{pki}/sg1.pem"]
remote.auth = "pubkey"
remote.cacerts = ["{pki}/ca.pem", "{pki}/{ca}"]
children.net.local_ts = ["10.1.0.0/16"]
children.net.remote_ts = ["10.2.0.0/16"]
[secrets.private-gw]
file = "{pki}/sg1.key"
"""


@pytest.mark.parametrize("what", list(NOT_CA), ids=list(NOT_CA))
def test_remote_cacerts_that_is_not_a_ca_is_refused_at_load(
    what: str, pkidir: Path, tmp_path: Path
) -> None:
    """remote.cacerts holding a leaf loaded, and refused every peer at its authentication
    ("no trusted CA": a chain ends only at a CA). Now a configuration error naming the key,
    the file and the certificate, at load and as gateway run's one line."""
    name, subject, why = NOT_CA[what]
    os.chmod(pkidir / "sg1.key", 0o600)
    good = tmp_path / "good.toml"
    good.write_text(IKE_GW.format(pki=pkidir, ca="ca.pem"))
    assert len(config.load(good).connections[0].cacerts) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text(IKE_GW.format(pki=pkidir, ca=name))
    with pytest.raises(ConfigError) as ei:
        config.load(bad)
    msg = str(ei.value)
    assert "connections.rw.remote.cacerts: " in msg, msg
    assert f"{pkidir}/{name}: {subject} is not a CA certificate" in msg and why in msg, msg
    r = ipsecct("gateway", "run", "-c", str(bad))
    one_line_error(r, "remote.cacerts", "is not a CA certificate")


@pytest.mark.parametrize("key", ["local.certs", "remote.cacerts"])
def test_a_missing_certificate_file_names_its_key(key: str, pkidir: Path, tmp_path: Path) -> None:
    """A certificate file that cannot be read is named with the key that lists it, as every
    other configuration error (README: the file, the key and the problem). It said only
    'connections.rw: cannot read certificate file ...', for local.certs and remote.cacerts
    alike (an operator's typo in swanctl.conf's ca file name, 2026-12-03)."""
    os.chmod(pkidir / "sg1.key", 0o600)
    text = IKE_GW.format(pki=pkidir, ca="ca.pem")
    old = f'"{pkidir}/sg1.pem"' if key == "local.certs" else f'"{pkidir}/ca.pem", '
    new = '"nosuch.pem"' if key == "local.certs" else '"nosuch.pem", '
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(old, new, 1))
    r = ipsecct("gateway", "run", "-c", str(bad))
    one_line_error(r, f"connections.rw.{key}: cannot read certificate file",
                   "nosuch.pem: No such file or directory")  # fmt: skip


def test_an_expired_ike_certificate_or_a_ca_not_valid_yet_is_logged_at_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """local.certs that had expired (or remote.cacerts not valid yet) loaded without a
    word: every peer refused our AUTH (or every client's chain from that CA was refused)
    and the log said nothing until a client failed. As for transfer.cert, the gateway still
    starts (a clock may be wrong, a new certificate on its way), and says which key, which
    file, which certificate, when."""
    import logging

    old = pki.make_gateway(pki.make_ca(NOW - dt.timedelta(days=30)), "sg1",
                           NOW - dt.timedelta(days=30), days=2)  # fmt: skip
    later = pki.make_ca(NOW + dt.timedelta(days=3))
    (tmp_path / "sg1.pem").write_bytes(pki.cert_pem(old.cert))
    (tmp_path / "sg1.key").write_bytes(pki.key_pem(old.key))
    os.chmod(tmp_path / "sg1.key", 0o600)
    (tmp_path / "later.pem").write_bytes(pki.cert_pem(later.cert))
    pki.init_pki(tmp_path / "good", ["sg2"], NOW)
    conf = tmp_path / "gw.toml"
    conf.write_text(IKE_GW.format(pki=tmp_path, ca="good/ca.pem").replace(
        f'"{tmp_path}/ca.pem", ', f'"{tmp_path}/later.pem", '))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        config.load(conf)
    lines = [r.getMessage() for r in caplog.records
             if "ike-certificate-not-valid-now" in r.getMessage()]  # fmt: skip
    assert len(lines) == 2, caplog.text
    assert (f"key=connections.rw.local.certs file=\"{tmp_path}/sg1.pem\" problem=\"'CN=sg1,"
            "O=ipsecct test PKI' expired on ") in lines[0], lines  # fmt: skip
    assert (f"key=connections.rw.remote.cacerts file=\"{tmp_path}/later.pem\" problem=\"'CN="
            "ipsecct test CA,O=ipsecct test PKI' is valid only from ") in lines[1], lines
    caplog.clear()
    (tmp_path / "sg1.pem").write_bytes((tmp_path / "good" / "sg2.pem").read_bytes())
    (tmp_path / "sg1.key").write_bytes((tmp_path / "good" / "sg2.key").read_bytes())
    (tmp_path / "later.pem").write_bytes((tmp_path / "good" / "ca.pem").read_bytes())
    with caplog.at_level(logging.WARNING):
        config.load(conf)
    assert "ike-certificate-not-valid-now" not in caplog.text


def test_rebalance_count_is_bounded_by_the_tunnels_here_and_one_transfers_limit(
    tmp_path: Path,
) -> None:
    """``rebalance --count 10**100`` (or 2 with one tunnel) moved every tunnel there was and
    said nothing; a count past what one transfer may carry was all sent and then refused by
    the target. Both are refused before anything moves, in one line; the count that fits
    still moves."""
    import asyncio

    from ipsecct.demo import topology as demo
    from ipsecct.errors import ControlError
    from ipsecct.ipsec.engine import TunnelState
    from tests.helpers.handover import run_demo, services

    async def body(d: demo.Demo) -> None:
        sg1 = services(d)["sg1"]
        (t,) = d.gateways["sg1"].node.engine.tunnels()
        for count, says in ((2, "more than the 1 tunnel(s) here that can move"),
                            (10**100, "one transfer carries at most 2 tunnels"),
                            (3, "one transfer carries at most 2 tunnels"),
                            (True, "needs --to PEER and --count N > 0"),
                            (0, "needs --to PEER and --count N > 0")):  # fmt: skip
            with pytest.raises(ControlError, match=re.escape(says)):
                await sg1.control_rebalance({"to": "sg2", "count": count})
        assert t.state is TunnelState.ACTIVE and not sg1.core.records
        rec = await asyncio.wait_for(sg1.control_rebalance({"to": "sg2", "count": 1}), 30)
        assert rec["outcome"] == "committed" and rec["tunnels"] == 1, rec
        with pytest.raises(ControlError, match="no tunnels to move"):
            await sg1.control_rebalance({"to": "sg2", "count": 1})

    run_demo(tmp_path, body, transfer={"max_contexts_per_transfer": 4})


@pytest.mark.parametrize(("enc", "key_len", "integ", "esn", "listed"), [
    ("aes-gcm-16", 20, "none", False, "AES_GCM_16-128"),
    ("aes-gcm-16", 36, "none", True, "AES_GCM_16-256/ESN"),
    ("aes-cbc", 16, "hmac-sha2-256-128", False, "AES_CBC-128/HMAC_SHA2_256_128"),
    ("aes-cbc", 24, "hmac-sha1-96", True, "AES_CBC-192/HMAC_SHA1_96/ESN"),
    ("chacha20-poly1305", 36, "none", False, "CHACHA20_POLY1305"),
    ("null", 0, "hmac-sha2-512-256", False, "NULL/HMAC_SHA2_512_256"),
])  # fmt: skip
def test_an_sas_algorithms_are_listed_as_swanctl_spells_them(
    enc: str, key_len: int, integ: str, esn: bool, listed: str
) -> None:
    """sa list's ENC column said "aes-gcm-16" (no key size, no integrity algorithm); now
    ALGORITHMS as swanctl --list-sas prints a CHILD SA's (``algorithms`` in --json, beside
    the unchanged ``enc`` and ``integ``)."""
    from ipsecct.ipsec.algorithms import enc_from_name, integ_from_name, swanctl_algorithms

    assert swanctl_algorithms(enc_from_name(enc), key_len, integ_from_name(integ), esn) == listed


@pytest.mark.parametrize("key", ["cert", "key", "ca"])
def test_a_transfer_file_name_too_long_is_a_config_error(key: str, tmp_path: Path) -> None:
    """transfer.cert (key, ca) naming a file longer than the system takes: Path.exists()
    raised ENAMETOOLONG out of config.load (an OSError, not a ConfigError naming the key)."""
    from tests.helpers.config_files import GOOD, write

    xfer = GOOD + ('[transfer]\nlisten = "127.0.0.2:25091"\ncert = "t1.keys"\nkey = "t1.keys"\n'
                   'ca = "t1.keys"\n[[peers]]\nname = "sg2"\naddress = "127.0.0.3:25091"\n')
    p = write(tmp_path, xfer.replace(f'{key} = "t1.keys"', f'{key} = "{"a" * 5000}"'))
    with pytest.raises(ConfigError, match=rf"transfer\.{key}: cannot read .*a{{5000}}: File name"):
        config.load(p)
    missing = write(tmp_path, xfer.replace(f'{key} = "t1.keys"', f'{key} = "gone.pem"'))
    with pytest.raises(ConfigError, match=rf"transfer\.{key}: no such file .*gone\.pem"):
        config.load(missing)


@pytest.mark.parametrize("where", ["a directory", "a missing directory"])
def test_bench_gateway_profile_that_cannot_be_written_is_one_line_before_it_runs(
    where: str, tmp_path: Path
) -> None:
    """``bench gateway --profile DIR`` ran the whole benchmark and exited 0 without a
    profile (the gateway's cProfile failed to write it at its exit, unseen)."""
    target = tmp_path if where == "a directory" else tmp_path / "no" / "prof.out"
    r = ipsecct("bench", "gateway", "--profile", str(target), "--time", "60", "--json")
    one_line_error(r, str(target))
    assert r.stdout == ""  # nothing measured: it stopped before the 60 s rounds


@pytest.mark.parametrize("args", [["--seconds", "0.01", "--rate", "1"],
                                  ["--seconds", "0.5", "--rate", "1", "--json"]])  # fmt: skip
def test_a_demo_stream_of_no_packet_is_refused_before_it_starts(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``demo --seconds 0.01 --rate 1`` started three processes, printed a summary of 0
    packets and exited 1 without a word of why."""
    from ipsecct import cli

    assert cli.main(["demo", *args]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.splitlines() == [f"ipsecct: error: --rate 1 for --seconds {args[1]} is no "
                                    "packet at all: the stream needs at least one"]  # fmt: skip


@pytest.mark.parametrize("field", ["age", "pmtu_expires_in"])
@pytest.mark.parametrize("value", ["1e308", "1.7976931348623157e308", "4398046511.104"])
def test_a_context_duration_past_the_limit_is_one_line_not_an_overflow(
    field: str, value: str, tmp_path: Path
) -> None:
    """``"age": 1e308`` in a context: 1000 times that is infinite, and round() raised
    OverflowError, a traceback from ``context encode`` (and an internal error at a gateway
    given it by ``sa add``)."""
    import json

    ctx = json.loads((ROOT / "examples" / "contexts" / "ah-sha512-ipv6.json").read_text())
    text = json.dumps({**ctx, field: 0}).replace(f'"{field}": 0', f'"{field}": {value}')
    (tmp_path / "c.json").write_text(text)
    r = ipsecct("context", "encode", str(tmp_path / "c.json"))
    one_line_error(r, field, "must be at most 4398046511 seconds")
    from ipsecct.ct import context
    from ipsecct.errors import ContextError

    with pytest.raises(ContextError, match="must be at most 4398046511 seconds"):
        context.from_json(json.loads(text), 0.0)  # (what the daemon makes of sa add's SA)


def test_an_expired_or_not_yet_valid_tls_certificate_is_logged_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway whose transfer.cert had expired (or whose CA was not valid yet) started
    without a word, and every transfer failed at its handshake. It still starts (a clock may
    be wrong, a new certificate on its way), and says which file, which certificate, when."""
    import logging

    from ipsecct.gateway.peers import PeerChannels

    ex = tmp_path / "ex"
    shutil.copytree(ROOT / "examples" / "transfer", ex)
    for k in (ex / "keys").iterdir():
        os.chmod(k, 0o600)
    pki.init_pki(ex / "pki", ["sg1", "sg2"], NOW)
    old = pki.make_gateway(pki.make_ca(NOW - dt.timedelta(days=30)), "sg1",
                           NOW - dt.timedelta(days=30), days=2)  # fmt: skip
    later = pki.make_ca(NOW + dt.timedelta(days=3))
    (ex / "pki" / "sg1.pem").write_bytes(pki.cert_pem(old.cert))
    (ex / "pki" / "sg1.key").write_bytes(pki.key_pem(old.key))
    (ex / "pki" / "ca.pem").write_bytes(pki.cert_pem(later.cert))
    tcfg = config.load(ex / "sg1.toml").transfer
    assert tcfg is not None
    with caplog.at_level(logging.WARNING):
        PeerChannels(tcfg, "sg1").load_credentials()
    lines = [r.getMessage() for r in caplog.records
             if "tls-certificate-not-valid-now" in r.getMessage()]  # fmt: skip
    assert len(lines) == 2, lines
    assert "sg1.pem: 'CN=sg1,O=ipsecct test PKI' expired on " in lines[0], lines
    assert "ca.pem: 'CN=ipsecct test CA,O=ipsecct test PKI' is valid only from " in lines[1]
    caplog.clear()
    pki.init_pki(ex / "pki", ["sg1", "sg2"], NOW, force=True)
    with caplog.at_level(logging.WARNING):
        PeerChannels(tcfg, "sg1").load_credentials()
    assert "tls-certificate-not-valid-now" not in caplog.text


@pytest.mark.parametrize("cands", ["[{}]", "[[]]", '[{a = 1}, "sg2"]'])
def test_transfer_candidates_that_are_not_names_are_a_config_error(
    cands: str, tmp_path: Path
) -> None:
    """``transfer.candidates = [{}]`` (a table where a peer's name belongs) raised TypeError
    (unhashable) out of config.load: a traceback from gateway run."""
    from tests.helpers.config_files import GOOD, write

    text = GOOD + ('[transfer]\nlisten = "127.0.0.2:25091"\ncert = "t1.keys"\nkey = "t1.keys"\n'
                   f'ca = "t1.keys"\ncandidates = {cands}\n[[peers]]\nname = "sg2"\n'
                   'address = "127.0.0.3:25091"\n')  # fmt: skip
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"transfer\.candidates: must list names of \[\[peers"):
        config.load(p)
    one_line_error(ipsecct("gateway", "run", "-c", str(p)), "transfer.candidates")


@pytest.mark.parametrize("where", ["a file", "a device"])
def test_a_state_dir_that_is_not_a_directory_is_named_so(where: str, tmp_path: Path) -> None:
    """``[state] dir`` naming a regular file (or /dev/null) said "File exists" (mkdir's
    EEXIST), which sent the operator looking for a collision."""
    from ipsecct.errors import StateError
    from ipsecct.gateway import state

    d = Path("/dev/null") if where == "a device" else tmp_path / "f"
    if where == "a file":
        d.write_text("x")
    with pytest.raises(StateError, match=f"cannot use state directory {d}: not a directory"):
        state.open_store(d, "sg1", [], fresh=False)


def test_gateway_run_of_a_mobile_nodes_configuration_says_so_in_one_line(
    tmp_path: Path,
) -> None:
    """``ipsecct gateway run -c examples/gateway/mn.toml`` ran a mobile node's configuration
    as a gateway without a word. Now one warning line names it and the command to use; the
    same file under ``node run``, and a gateway's, say nothing of it."""
    import tempfile

    from tests.helpers.daemon import Daemon, copy_keys, free_udp_port, node_toml

    copy_keys(tmp_path, "mn-sg1.keys", "sg1-mn.keys")
    mn = {"name": "mn-sg1", "local_ts": "10.1.0.2/32", "remote_ts": "10.2.0.0/24",
          "peer": "127.0.0.2:24500", "enc": "aes-gcm-16", "esn": True,
          "spi_out": 0x10000001, "spi_in": 0x20000001, "keys": str(tmp_path / "mn-sg1.keys")}
    sg = {**mn, "name": "sg1-mn", "local_ts": "10.2.0.0/24", "remote_ts": "10.1.0.2/32",
          "spi_out": 0x20000001, "spi_in": 0x10000001, "keys": str(tmp_path / "sg1-mn.keys")}
    d = tempfile.mkdtemp(prefix="ipsecct-c-", dir="/tmp")  # (a socket path short enough)
    try:
        for role, tunnel, warned in (("gateway", mn, True), ("node", mn, False),
                                     ("gateway", sg, False)):  # fmt: skip
            sock = os.path.join(d, f"{role}.sock")
            cfg = tmp_path / f"{role}-{tunnel['name']}.toml"
            ports = (free_udp_port(), free_udp_port(), free_udp_port())
            cfg.write_text(node_toml("n", *ports, sock, [tunnel]))
            daemon = Daemon(role, cfg, sock, tmp_path / f"{role}-{tunnel['name']}.log")
            try:
                daemon.start()
                assert daemon.terminate() == 0
            finally:
                daemon.cleanup()
            lines = [ln for ln in daemon.log.read_text().splitlines()
                     if "config-looks-like-a-node" in ln]  # fmt: skip
            assert len(lines) == (1 if warned else 0), (role, tunnel["name"], lines)
            if warned:
                assert "WARNING" in lines[0] and "10.1.0.2" in lines[0], lines
                assert "ipsecct node run" in lines[0], lines
    finally:
        shutil.rmtree(d, ignore_errors=True)
