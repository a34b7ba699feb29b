"""Configuration files: the shipped examples load, and every kind of bad file is a ConfigError
that names the file and the key (and, at the command line, one line on stderr, exit status 2)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ipsecct.errors import ConfigError
from ipsecct.gateway import config, control
from ipsecct.ipsec.sad import Direction, Mode
from tests.helpers.config_files import GOOD, KEYS, write

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "gateway"

def copy_keys(dst: Path) -> None:
    """Copy the example key files, mode 0600 (git cannot keep that mode)."""
    (dst / "keys").mkdir(exist_ok=True)
    for f in (EXAMPLES / "keys").glob("*.keys"):
        shutil.copy(f, dst / "keys" / f.name)
        os.chmod(dst / "keys" / f.name, 0o600)


@pytest.mark.parametrize("name", ["mn", "sg1", "sg2"])
def test_examples_load(name: str, tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / f"{name}.toml", tmp_path)
    copy_keys(tmp_path)
    cfg = config.load(tmp_path / f"{name}.toml")
    assert cfg.name == name
    assert cfg.inner.kind == "udp"
    # A bare name: the socket lives in the private runtime directory the client looks in.
    assert cfg.control_socket == str(control.runtime_dir() / f"{name}.sock")
    for t in cfg.tunnels:
        assert t.outbound.direction is Direction.OUTBOUND
        assert t.inbound.direction is Direction.INBOUND
        assert t.outbound.mode is Mode.TUNNEL
        assert t.outbound.esn and t.outbound.replay_window == 1024
        assert len(t.outbound.enc_key) == 20 and t.outbound.encap is not None
        # the key is nowhere in what an operator or a log sees
        assert t.outbound.enc_key.hex() not in repr(t.outbound)


def test_examples_agree_with_each_other(tmp_path: Path) -> None:
    """Each gateway's tunnel is the mirror image of the MN's: SPIs, keys, addresses, ports."""
    for n in ("mn", "sg1", "sg2"):
        shutil.copy(EXAMPLES / f"{n}.toml", tmp_path)
    copy_keys(tmp_path)
    mn = config.load(tmp_path / "mn.toml")
    for sg_name, t_mn in zip(("sg1", "sg2"), mn.tunnels, strict=True):
        sg = config.load(tmp_path / f"{sg_name}.toml")
        (t_sg,) = sg.tunnels
        assert t_mn.peer == sg.outer and t_sg.peer == mn.outer
        assert t_mn.outbound.spi == t_sg.inbound.spi
        assert t_mn.inbound.spi == t_sg.outbound.spi
        assert t_mn.outbound.enc_key == t_sg.inbound.enc_key
        assert t_mn.inbound.enc_key == t_sg.outbound.enc_key
        assert t_mn.outbound.enc_key != t_mn.inbound.enc_key
        assert t_mn.outbound.dst == t_sg.inbound.dst == sg.outer.host
        assert t_mn.policy.selectors.local == t_sg.policy.selectors.remote


def test_good_config_loads(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, GOOD))
    (t,) = cfg.tunnels
    assert t.outbound.spi == 0x20000001 and t.inbound.spi == 0x10000001
    assert t.outbound.enc_key == bytes.fromhex("22" * 20)
    assert t.inbound.enc_key == bytes.fromhex("11" * 20)
    assert len(cfg.policies) == 1 and cfg.policies[0].static
    assert not t.policy.static


def test_keys_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPSECCT_TEST_KEYS", KEYS)
    cfg = config.load(
        write(
            tmp_path, GOOD.replace('keys = "t1.keys"', 'keys_env = "IPSECCT_TEST_KEYS"'), keys=None
        )
    )
    assert cfg.tunnels[0].inbound.enc_key == bytes.fromhex("11" * 20)


# (replace this, with that, the error names these) -- each a separate bad file
BAD: list[tuple[str, str, str, list[str]]] = [
    ("missing name", 'name = "sg1"\n', "", ["name", "missing"]),
    ("missing tunnel key", "spi_in = 0x10000001\n", "", ["spi_in", "missing"]),
    ("missing peer", 'peer = "127.0.0.1:14500"\n', "", ["peer", "missing"]),
    ("wrong type", "port = 24500", 'port = "24500"', ["outer.port", "int", "str"]),
    ("wrong type bool", "spi_out = 0x20000001", "spi_out = true", ["spi_out", "int"]),
    ("unknown top key", 'name = "sg1"', 'name = "sg1"\nfoo = 1', ["foo", "unknown key"]),
    ("unknown tunnel key", 'name = "t1"', 'name = "t1"\nreplay = 3', ["replay", "unknown"]),
    ("unknown outer key", "port = 24500", "port = 24500\nprot = 1", ["outer.prot", "unknown"]),
    ("unknown log key", 'level = "info"', 'level = "info"\nlevle = "x"', ["log.levle"]),
    ("bad level", 'level = "info"', 'level = "loud"', ["log.level"]),
    ("bad outer address", '"127.0.0.2"', '"127.0.0.256"', ["outer.address"]),
    ("bad peer", '"127.0.0.1:14500"', '"127.0.0.1:99999"', ["peer", "bad address"]),
    ("bad listen", '"127.0.0.2:25000"', '"localhost:25000"', ["inner.listen"]),
    ("bad ts", '"10.1.0.2/32"', '"10.1.0.300/32"', ["remote_ts", "10.1.0.300"]),
    ("mixed family", '"127.0.0.1:14500"', '"[::1]:14500"', ["peer", "family"]),
    ("bad enc", 'keys = "t1.keys"', 'keys = "t1.keys"\nenc = "des"', ["enc", "des"]),
    ("bad integ", 'keys = "t1.keys"', 'keys = "t1.keys"\ninteg = "md5"', ["integ", "md5"]),
    ("bad mode", 'keys = "t1.keys"', 'keys = "t1.keys"\nmode = "bent"', ["mode"]),
    ("bad df", 'keys = "t1.keys"', 'keys = "t1.keys"\ndf = "maybe"', ["df"]),
    ("bad action", '"discard"', '"protect"', ["policy[0].action"]),
    ("bad kind", 'kind = "udp"', 'kind = "pipe"', ["inner.kind"]),
    ("reserved spi", "spi_in = 0x10000001", "spi_in = 7", ["tunnel[0]", "SPI"]),
    # the key named, in hex as written: "tunnel[0] (t1): SPI 8589934591 is reserved ..."
    ("spi over 32 bits", "spi_in = 0x10000001", "spi_in = 0x1ffffffff",
     ["tunnel[0] (t1).spi_in: 0x1ffffffff is no SPI"]),
    ("negative spi", "spi_out = 0x20000001", "spi_out = -1", ["spi_out: -1 is no SPI"]),
    # quoted as in the context JSON: said how to write it ("must be int, not str")
    ("quoted spi", "spi_in = 0x10000001", 'spi_in = "0x10000001"',
     ["tunnel[0] (t1).spi_in: must be a number without quotes (spi_in = 0x10000001"]),
    (
        "bad lifetime",
        'keys = "t1.keys"',
        'keys = "t1.keys"\nhard_lifetime = {packets = -1}',
        ["hard_lifetime.packets", "positive"],
    ),
    # (was taken, and every transfer of the tunnel then failed: "cannot encode the contexts:
    # hard time limit is longer than 4398046511103 ms"; inf and nan ran, never expiring)
    (
        "lifetime beyond the context's",
        'keys = "t1.keys"',
        'keys = "t1.keys"\nhard_lifetime = {seconds = 1e12}',
        ["hard_lifetime.seconds", "at most 4398046511"],
    ),
    # (taken too: such a tunnel could be neither transferred ("soft.bytes out of range
    # 0-18446744073709551615") nor replicated to a standby (skipped, counted unreplicable))
    (
        "lifetime bytes beyond the context's",
        'keys = "t1.keys"',
        'keys = "t1.keys"\nhard_lifetime = {bytes = 18446744073709551616}',
        ["hard_lifetime.bytes", "at most 18446744073709551615"],
    ),
    (
        "lifetime packets beyond the context's",
        'keys = "t1.keys"',
        'keys = "t1.keys"\nsoft_lifetime = {packets = 18446744073709551616}',
        ["soft_lifetime.packets", "at most 18446744073709551615"],
    ),
    (
        "lifetime not finite",
        'keys = "t1.keys"',
        'keys = "t1.keys"\nsoft_lifetime = {seconds = inf}',
        ["soft_lifetime.seconds", "at most"],
    ),
    (
        "metrics not loopback",
        'socket = "/tmp/x.sock"',
        'socket = "/tmp/x.sock"\nmetrics = "0.0.0.0:9000"',
        ["control.metrics", "loopback"],
    ),
    # (loaded, and served on whatever port the kernel picked: no scraper could be told it)
    (
        "metrics on port 0",
        'socket = "/tmp/x.sock"',
        'socket = "/tmp/x.sock"\nmetrics = "127.0.0.1:0"',
        ["control.metrics", "port 0 serves on a port nobody can know"],
    ),
    ("key file missing", '"t1.keys"', '"nope.keys"', ["keys", "nope.keys"]),
    ("keys and keys_env", 'keys = "t1.keys"', 'keys = "t1.keys"\nkeys_env = "X"', ["keys"]),
    ("no keys", 'keys = "t1.keys"\n', "", ["keys", "missing"]),
    (
        "keys_env unset",
        'keys = "t1.keys"',
        'keys_env = "IPSECCT_SURELY_UNSET_VAR"',
        ["keys_env", "IPSECCT_SURELY_UNSET_VAR", "not set"],
    ),
    (
        "tun addresses not strings",
        'kind = "udp"\nlisten = "127.0.0.2:25000"\npeer = "127.0.0.2:25001"',
        'kind = "tun"\naddresses = [5]',
        ["inner.addresses"],
    ),
    # a NUL in a file name made open() raise ValueError: a traceback
    ("nul in a path", 'keys = "t1.keys"', 'keys = "t1\\u0000.keys"', ["tunnel[0].keys", "NUL"]),
    (
        "duplicate tunnel",
        "[[tunnel]]",
        "[[tunnel]]\n" + GOOD.split("[[tunnel]]\n")[1] + "\n[[tunnel]]",
        ["tunnel", "unique"],
    ),
]


@pytest.mark.parametrize(("what", "old", "new", "names"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_file_and_key(
    what: str, old: str, new: str, names: list[str], tmp_path: Path
) -> None:
    assert old in GOOD, what
    p = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: "), msg
    for n in names:
        assert n in msg, (n, msg)
    assert "\n" not in msg


BAD_KEYS: list[tuple[str, str, list[str]]] = [
    ("short key", 'in_enc = "1111"\nout_enc = "{}"\n'.format("22" * 20), ["in_enc", "20", "not 2"]),
    ("no out key", 'in_enc = "{}"\n'.format("11" * 20), ["keys", "out_enc"]),
    (
        "not hex",
        'in_enc = "zz{}"\nout_enc = "{}"\n'.format("11" * 19, "22" * 20),
        ["in_enc", "hex"],
    ),
    ("unknown key", KEYS + 'extra = "00"\n', ["extra", "unknown"]),
    ("not toml", "in_enc = \n", ["not valid TOML"]),
    (
        "hmac key missing",
        'in_enc = "{}"\nout_enc = "{}"\n'.format("11" * 16, "22" * 16),
        ["in_integ"],
    ),
    (
        "hmac key short",
        'in_enc = "{0}"\nout_enc = "{0}"\nin_integ = "{1}"\nout_integ = "{2}"\n'.format(
            "11" * 16, "22" * 32, "22" * 31
        ),
        ["out_integ", "32 octets, not 31"],
    ),
]


def test_no_seq_sent_twice_an_aes_ctr_key_of_both_directions_is_refused(tmp_path: Path) -> None:
    """AES-CTR's IV is the sequence number too (RFC 3686, the nonce the key's last four
    octets): one key both ways is one keystream from both ends, as for AES-GCM
    (tests/test_hostile_inputs.py::test_no_seq_sent_twice_an_aead_key_of_both_directions_is_a_configuration_error);
    AES-CBC's IV is random, and one key both ways is taken (as before)."""
    keys = 'in_enc = "{0}"\nout_enc = "{0}"\nin_integ = "{1}"\nout_integ = "{2}"\n'
    for enc, key, refused in (("aes-ctr", "11" * 20, True), ("aes-cbc", "11" * 16, False)):
        text = GOOD.replace('keys = "t1.keys"',
                            f'keys = "t1.keys"\nenc = "{enc}"\ninteg = "hmac-sha2-256-128"')
        p = write(tmp_path, text, keys=keys.format(key, "22" * 32, "33" * 32))
        if not refused:
            config.load(p)
            continue
        with pytest.raises(ConfigError, match=r"tunnel\[0\] \(t1\)\.keys: in_enc and out_enc"
                           r" are one AES-CTR key"):  # fmt: skip
            config.load(p)


@pytest.mark.parametrize(("what", "keys", "names"), BAD_KEYS, ids=[b[0] for b in BAD_KEYS])
def test_bad_key_file(what: str, keys: str, names: list[str], tmp_path: Path) -> None:
    text = GOOD
    if what.startswith("hmac"):
        text = GOOD.replace(
            'keys = "t1.keys"', 'keys = "t1.keys"\nenc = "aes-cbc"\ninteg = "hmac-sha2-256-128"'
        )
    p = write(tmp_path, text, keys=keys)
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    msg = str(ei.value)
    assert "t1.keys" in msg, msg
    for n in names:
        assert n in msg, (n, msg)
    # a key value is never echoed
    assert "2222222222" not in msg and "1111111111" not in msg


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "x.toml"
    p.write_text("name = \n")
    with pytest.raises(ConfigError, match=f"^{p}: not valid TOML"):
        config.load(p)
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.toml")


def test_files_that_are_not_utf8_are_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A configuration, key or secret file that is not UTF-8 text made tomllib / read_text
    raise UnicodeDecodeError: a traceback, which for a key file quoted one of its octets."""
    from ipsecct import cli

    p = tmp_path / "x.toml"
    p.write_bytes(b'name = "\xff\xfe"\n')
    for read in (config.load, config.control_socket_of, config.cluster_of):
        with pytest.raises(ConfigError, match=f"^{p}: not valid TOML: not UTF-8"):
            read(p)
    assert cli.main(["status", "-c", str(p)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    secret = b"\x8f\xd3" + bytes(range(0xC0, 0xE0))
    p = write(tmp_path, GOOD, keys=None)
    (tmp_path / "t1.keys").write_bytes(b'in_enc = "' + secret + b'"\n')
    with pytest.raises(ConfigError, match=r"t1\.keys: not UTF-8") as ei:
        config.load(p)
    assert "0x8f" not in str(ei.value) and "\\x8f" not in repr(ei.value)
    (tmp_path / "rw.psk").write_bytes(secret)
    data = {"secrets": {"ike-rw": {"id": "gw.test", "file": "rw.psk"}}}
    with pytest.raises(ConfigError, match=r"rw\.psk: not UTF-8 text .* 0x\.\.\. hex"):
        config.load_secrets(data, str(tmp_path / "gw.toml"))


XFER = GOOD + (
    '[transfer]\nlisten = "127.0.0.2:25091"\ncert = "t1.keys"\nkey = "t1.keys"\n'
    'ca = "t1.keys"\n[[peers]]\nname = "sg2"\naddress = "127.0.0.3:25091"\n'
)


def test_wrong_types_in_lists_are_config_errors(tmp_path: Path) -> None:
    """A list where a string belongs (peers.allow's items, failover.peer) raised TypeError
    (unhashable type) instead of naming the key; a peer with the gateway's own name, or
    twice the same peer (the second replaced the first), was taken."""
    for extra, key in (('allow = [["send"]]\n', "peers[0].allow"),
                       # a peer named like this gateway: it connected to itself
                       ('[[peers]]\nname = "sg1"\naddress = "127.0.0.2:25091"\n', "peers: 'sg1'"),
                       ('[[peers]]\nname = "sg2"\naddress = "127.0.0.4:25091"\n',
                        "peers[1].name: 'sg2' is listed twice"),
                       ('[failover]\nrole = "active"\npeer = ["sg2"]\n', "failover.peer")):
        with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
            config.load(write(tmp_path, XFER + extra))


def test_a_peers_fail_over_pair_is_named_in_either_entry(tmp_path: Path) -> None:
    """[[peers]] pair: either entry names the other; both may then ask about each other's
    transfers (Settings.pairs); a pair that is not another peer is a config error."""
    sg3 = '[[peers]]\nname = "sg3"\naddress = "127.0.0.4:25091"\npair = "sg2"\n'
    cfg = config.load(write(tmp_path, XFER + sg3))
    assert cfg.transfer is not None
    assert cfg.transfer.settings.pairs == {"sg2": frozenset({"sg3"}), "sg3": frozenset({"sg2"})}
    assert config.load(write(tmp_path, XFER)).transfer.settings.pairs == {}  # type: ignore[union-attr]
    for bad in ('"sg9"', '"sg3"', "1"):
        with pytest.raises(ConfigError, match=r"peers\[1\]\.pair: must name another"):
            config.load(write(tmp_path, XFER + sg3.replace('"sg2"', bad)))


def test_the_overall_relay_cap_is_configurable_with_a_documented_default(tmp_path: Path) -> None:
    """[transfer] relay_max_rate: datagrams a second all relays of moved tunnels send
    together (ipsec/relay.py); 100,000 by default; not a number from 1 to 10,000,000: a
    ConfigError naming the key."""
    from ipsecct.ipsec import relay

    cfg = config.load(write(tmp_path, XFER))
    assert cfg.transfer is not None and cfg.transfer.relay_max_rate == relay.RATE_ALL == 100_000
    set_to = XFER.replace("[transfer]\n", "[transfer]\nrelay_max_rate = 2500\n")
    assert config.load(write(tmp_path, set_to)).transfer.relay_max_rate == 2500  # type: ignore[union-attr]
    assert relay.cap_burst(2500) == relay.BURST and relay.cap_burst(1e6) == 1e5
    for bad in ("0", "-1", "nan", "inf", "true", '"fast"', "20000000"):
        with pytest.raises(ConfigError, match=r"transfer\.relay_max_rate"):
            config.load(write(tmp_path, XFER.replace(
                "[transfer]\n", f"[transfer]\nrelay_max_rate = {bad}\n")))  # fmt: skip


@pytest.mark.parametrize("value", ["nan", "inf", "1" + "0" * 400])
def test_durations_and_counts_must_be_finite(tmp_path: Path, value: str) -> None:
    """nan, inf and 10**400 passed "positive": sync_packets = inf was an OverflowError
    traceback, 10**400 ms one in float(), and inf a transfer that never timed out."""
    failover = '[failover]\nrole = "active"\npeer = "sg2"\n'
    for extra, key in ((f"allow = [\"send\"]\n{failover}sync_packets = {value}\n",
                        "failover.sync_packets"),
                       (f"{failover}sync_ms = {value}\n", "failover.sync_ms"),
                       ("", "transfer.max_transfer_ms"), ("", "transfer.forward_ms")):  # fmt: skip
        text = XFER + extra
        if key.startswith("transfer."):
            text = text.replace("[transfer]\n", f"[transfer]\n{key[9:]} = {value}\n")
        with pytest.raises(ConfigError, match=key):
            config.load(write(tmp_path, text))


@pytest.mark.parametrize("role", ["gateway", "node"])
def test_cli_bad_config_is_one_line_exit_2(role: str, tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace('"10.1.0.2/32"', '"10.1.0.2/33"'))
    r = subprocess.run(
        [sys.executable, "-m", "ipsecct", role, "run", "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"ipsecct: error: {p}: tunnel[0] (t1).remote_ts")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:99999", "http://h:x",
                                 "https://h:2379", "http://h:2379/v3", "http://"])  # fmt: skip
def test_bad_etcd_endpoints_are_config_errors(tmp_path: Path, url: str) -> None:
    """An open bracket or a port past 65535 made urlsplit raise ValueError: a traceback from
    gateway run and cluster status."""
    from ipsecct.errors import EtcdError
    from ipsecct.gateway.etcd import EtcdClient

    p = write(tmp_path, XFER + f'[cluster]\netcd = ["{url}"]\n')
    for read in (config.load, config.cluster_of):
        with pytest.raises(ConfigError, match=r"cluster\.etcd: etcd endpoint .* only http://"):
            read(p)
    with pytest.raises(EtcdError):
        EtcdClient([url])


def _key_paths(d: object, at: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every key of a parsed TOML document, at any depth (tables in arrays too)."""
    out: list[tuple[str | int, ...]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            out.append((*at, k))
            out += _key_paths(v, (*at, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _key_paths(v, (*at, i))
    return out


def test_a_misspelt_key_anywhere_in_the_examples_is_refused_by_name(tmp_path: Path) -> None:
    """Each key of each shipped example configuration, misspelt (one letter more), is refused
    with an error naming the misspelt key, never ignored: "peers[0]: needs a name" and
    "transfer.balance: must be a table with ..." did not say which key was wrong. Names the
    operator chooses (a connection, a child, a secret's suffix) are not keys."""
    import copy
    import tomllib

    NAMED = ("connections", "children")
    shutil.copytree(EXAMPLES.parent, tmp_path / "examples",
                    ignore=shutil.ignore_patterns("pki", "state"))  # fmt: skip
    for d in ("transfer", "failover", "ikev2"):
        r = subprocess.run([sys.executable, "-m", "ipsecct", "pki", "init", "--dir",
                            str(tmp_path / "examples" / d / "pki"), "--gateways", "sg1,sg2"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "examples").glob("*/*.toml"))
    assert len(files) == 12
    checked = 0
    for f in files:
        data = tomllib.loads(f.read_text())
        config.from_dict(copy.deepcopy(data), str(f))  # loads as shipped
        # transfer.balance is in no example: the gateway one's sg1 gets it
        if f.parent.name == "transfer" and f.stem == "sg1":
            data["transfer"]["balance"] = {"above": 10, "to": "sg2", "batch": 5, "interval_ms": 50}
            config.from_dict(copy.deepcopy(data), str(f))
        for path in _key_paths(data):
            key = path[-1]
            if isinstance(key, int) or (path[:1] == ("secrets",) and len(path) == 2):
                continue
            if len(path) > 1 and path[0] == "connections" and path[-2] in NAMED:
                continue  # a connection's or a child's name
            bad = copy.deepcopy(data)
            holder: Any = bad
            for k in path[:-1]:
                holder = holder[k]
            # (a secret's id<suffix> is swanctl's id-1, id-2, ...: idx is one of them)
            wrong = f"x{key}" if path[0] == "secrets" and key.startswith("id") else f"{key}x"
            holder[wrong] = holder.pop(key)
            with pytest.raises(ConfigError) as ei:
                config.from_dict(bad, str(f))
            assert wrong in str(ei.value), (f, path, str(ei.value))
            checked += 1
    assert checked > 200


# TOML that tomllib parses only by recursing once per level, an integer past CPython's
# 4300-digit limit for int(str), and a table header of 20,000 dotted parts (quadratic in
# tomllib: seconds of CPU, hours at the 16 MiB limit; a table as deep, for the NUL check).
DEEP_TOML = {
    "nested arrays": "a = " + "[" * 50_000 + "]" * 50_000 + "\n",
    "nested inline tables": "a = " + "{b = " * 5_000 + "1" + "}" * 5_000 + "\n",
    "long integer": 'name = "sg1"\n[outer]\nport = 1' + "0" * 5_000 + "\n",
}


@pytest.mark.parametrize("what", list(DEEP_TOML), ids=list(DEEP_TOML))
def test_toml_too_deep_or_too_long_is_a_config_error(
    what: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nested arrays or inline tables made tomllib raise RecursionError and a long integer
    ValueError: a traceback from every command that reads a configuration (gateway run,
    status -c ...) and from a tunnel's key file."""
    from ipsecct import cli

    p = tmp_path / "x.toml"
    p.write_text(DEEP_TOML[what])
    for read in (config.load, config.control_socket_of, config.cluster_of):
        with pytest.raises(ConfigError, match=f"^{p}: not valid TOML: "):
            read(p)
    assert cli.main(["status", "-c", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    p = write(tmp_path, GOOD, keys=DEEP_TOML[what])
    with pytest.raises(ConfigError, match=r"t1\.keys is not valid TOML"):
        config.load(p)


@pytest.mark.parametrize(
    "line",
    [
        "[" + ".".join(["t"] * 100_000) + "]\n",  # a table header
        ".".join(["k"] * 30_000) + " = 1\n",  # a dotted key: 7 s of CPU for 60 kB
        "a = {" + ".".join(["k"] * 100_000) + " = 1}\n",  # in an inline table
    ],
    ids=["header", "dotted key", "inline table"],
)
def test_a_key_of_thousands_of_dotted_parts_is_refused_before_tomllib_reads_it(
    line: str, tmp_path: Path
) -> None:
    """tomllib takes time quadratic (or worse) in the parts of one dotted key: a 200 kB
    configuration held gateway run for seconds (a 16 MiB one for hours) before any error.
    No key of a configuration has more than a few parts: more than 64 dots on a line, outside
    strings and comments, is refused at once, naming the line."""
    p = tmp_path / "x.toml"
    p.write_text('name = "sg1"  # a comment with dots ' + "." * 300 + "\n" + line)
    with pytest.raises(ConfigError, match=f"^{p}: not valid TOML: line 2: "):  # not tomllib's
        config.load(p)
    p = write(tmp_path, GOOD, keys=line)
    with pytest.raises(ConfigError, match=r"t1\.keys is not valid TOML: line 1: "):
        config.load(p)


def test_dots_in_strings_and_comments_are_not_key_parts(tmp_path: Path) -> None:
    many = ", ".join(f'"10.1.0.{i}/32"' for i in range(60))  # 180 dots in strings
    text = GOOD.replace('remote_ts = "10.1.0.2/32"', f"remote_ts = [{many}]  # ....... .\n")
    cfg = config.load(write(tmp_path, text.replace("[log]", "[log]\n# " + "." * 500)))
    assert len(cfg.tunnels) == 1


@pytest.mark.parametrize("what", ["fifo", "directory"])
def test_a_transfer_certificate_that_is_not_a_regular_file_is_named_so(
    what: str, tmp_path: Path
) -> None:
    """transfer.cert (key, ca) naming a FIFO or a directory said 'no such file', which it
    is not: the operator looked for a missing file."""
    odd = tmp_path / "odd.pem"
    if what == "fifo":
        os.mkfifo(odd)
    else:
        odd.mkdir()
    text = XFER.replace('cert = "t1.keys"', f'cert = "{odd}"')
    assert text != XFER
    with pytest.raises(ConfigError, match=r"transfer\.cert: cannot read .*odd\.pem: ") as ei:
        config.load(write(tmp_path, text))
    assert "no such file" not in str(ei.value)


T2 = """
[[tunnel]]
name = "t2"
local_ts = "10.2.0.0/24"
remote_ts = "10.1.0.2/32"
peer = "127.0.0.1:14500"
spi_in = 0x10000002
spi_out = 0x20000002
keys = "t1.keys"
"""


def test_a_tunnel_no_packet_could_use_or_an_spi_the_sad_holds_twice_is_named_at_load(
    tmp_path: Path,
) -> None:
    """A second [[tunnel]] with the first's selectors loaded silently and never carried a
    packet (the first PROTECT entry takes them all; Linux refuses such a policy: "File
    exists"); one with the first's spi_out to the same peer stopped gateway run with only
    "SPI 0x20000001 is already in use for ESP to 127.0.0.1", naming neither file nor key."""
    p = write(tmp_path, GOOD + T2)
    with pytest.raises(ConfigError, match=rf"^{p}: tunnel\[1\] \(t2\)\.local_ts: the same "
                                          "traffic selectors as tunnel t1"):  # fmt: skip
        config.load(p)
    p = write(tmp_path, GOOD + T2.replace('"10.1.0.2/32"', '"10.1.0.3/32"')
              .replace("spi_out = 0x20000002", "spi_out = 0x20000001"))  # fmt: skip
    with pytest.raises(ConfigError, match=rf"^{p}: tunnel\[1\] \(t2\)\.spi_out: 0x20000001 "
                                          "to 127.0.0.1 is tunnel t1's spi_out too"):  # fmt: skip
        config.load(p)
    # what may be: a narrower tunnel inside the first's, an spi_out to another peer
    ok = (GOOD + T2.replace('"10.2.0.0/24"', '"10.2.0.0/25"')
          .replace("spi_out = 0x20000002", "spi_out = 0x20000001")
          .replace('peer = "127.0.0.1:14500"', 'peer = "127.0.0.9:14500"'))  # fmt: skip
    assert [t.name for t in config.load(write(tmp_path, ok)).tunnels] == ["t1", "t2"]


def test_a_byte_order_mark_is_named_in_a_configuration_and_a_key_file(tmp_path: Path) -> None:
    """A configuration saved by an editor that writes a UTF-8 byte-order mark said "not valid
    TOML: Invalid statement (at line 1, column 1)", naming nothing one could see."""
    p = write(tmp_path, "\ufeff" + GOOD)
    with pytest.raises(ConfigError, match=rf"^{p}: not valid TOML: .*byte-order mark"):
        config.load(p)
    p = write(tmp_path, GOOD, keys="\ufeff" + KEYS)
    with pytest.raises(ConfigError, match=r"t1\.keys is not valid TOML: .*byte-order mark"):
        config.load(p)


def test_selectors_whose_sides_share_no_address_family_are_refused(tmp_path: Path) -> None:
    """local_ts = "::/0" with remote_ts = "10.1.0.2/32" loaded and made a tunnel (or a
    policy) no packet can match: an IP packet's source and destination are one family."""
    p = write(tmp_path, GOOD.replace('local_ts = "10.2.0.0/24"', 'local_ts = "2001:db8::/64"'))
    with pytest.raises(ConfigError, match=rf"^{p}: tunnel\[0\] \(t1\)\.remote_ts: IPv4 only, "
                                          "and local_ts IPv6 only"):  # fmt: skip
        config.load(p)
    p = write(tmp_path, GOOD.replace('remote = "10.1.0.99"', 'remote = "2001:db8::99"'))
    with pytest.raises(ConfigError, match=r"policy\[0\]\.remote: IPv6 only, and local IPv4"):
        config.load(p)
    both = GOOD.replace('local_ts = "10.2.0.0/24"', 'local_ts = ["10.2.0.0/24", "2001:db8::/64"]')
    assert len(config.load(write(tmp_path, both)).tunnels) == 1  # one family in common: fine


def test_a_mobile_nodes_configuration_is_told_from_a_gateways(tmp_path: Path) -> None:
    """What ``gateway run`` warns about (config.node_shape): one host on the inner side,
    in every tunnel, talking to networks. A gateway protecting a network, or one server
    talking to hosts, or holding a gateway-only section, is not taken for a node."""
    mn = GOOD.replace('local_ts = "10.2.0.0/24"\nremote_ts = "10.1.0.2/32"',
                      'local_ts = "10.1.0.2/32"\nremote_ts = "10.2.0.0/24"')  # fmt: skip
    assert mn != GOOD
    shape = config.node_shape(config.load(write(tmp_path, mn)))
    assert shape is not None and "10.1.0.2" in shape
    assert config.node_shape(config.load(write(tmp_path, GOOD))) is None
    server = GOOD.replace('local_ts = "10.2.0.0/24"', 'local_ts = "10.2.0.5/32"')
    assert config.node_shape(config.load(write(tmp_path, server))) is None
    # a second tunnel from another inner host: not one home address
    second = ('\n[[tunnel]]\nname = "t2"\nlocal_ts = "10.1.0.3/32"\nremote_ts = "10.3.0.0/24"\n'
              'peer = "127.0.0.1:14501"\nspi_in = 0x30000001\nspi_out = 0x40000001\n'
              'keys = "t1.keys"\n')  # fmt: skip
    assert config.node_shape(config.load(write(tmp_path, mn + second))) is None
    assert config.node_shape(config.load(write(tmp_path, mn + second.replace(
        "10.1.0.3/32", "10.1.0.2/32")))) is not None  # (the same home address: a node)
    virtual = mn.replace("port = 24500", 'port = 24500\nvirtual = "127.0.0.9"')
    assert virtual != mn and config.node_shape(config.load(write(tmp_path, virtual))) is None


def test_own_addresses_are_the_outer_the_virtual_and_the_tun_ones(tmp_path: Path) -> None:
    """What ``sa add`` counts as this gateway's own (an inbound SA to none of them is
    warned about): outer.address, outer.virtual (a cluster's or pair's shared address) and
    the TUN device's addresses, which exist only once the gateway has set the device up."""
    cfg = config.load(write(tmp_path, GOOD))
    assert [str(a) for a in config.own_addresses(cfg)] == ["127.0.0.2"]
    text = GOOD.replace("port = 24500", 'port = 24500\nvirtual = "127.0.0.9"').replace(
        'kind = "udp"\nlisten = "127.0.0.2:25000"\npeer = "127.0.0.2:25001"',
        'kind = "tun"\naddresses = ["10.2.0.1/24", "fd00::1/64"]')  # fmt: skip
    cfg = config.load(write(tmp_path, text))
    assert [str(a) for a in config.own_addresses(cfg)] == [
        "127.0.0.2", "127.0.0.9", "10.2.0.1", "fd00::1"]  # fmt: skip


@pytest.mark.parametrize(("text", "hint"), [
    ('name = "gw"\n[connections.rw]\nproposals = aes128gcm16-prfsha256-x25519\n',
     "; TOML quotes a string (key = \"value\"), which swanctl.conf does not"),
    ('name = "gw"\n[connections.rw]\nlocal { auth = psk }\n',
     "; this is swanctl.conf's syntax: here a block is a TOML table"),
    ("connections {\n  gw {\n    version = 2\n  }\n}\n",
     "; this is swanctl.conf's syntax: here a block is a TOML table"),
    ('name = "gw"\nport = 12abc\n', None),  # not swanctl's: tomllib's words alone
])  # fmt: skip
def test_swanctl_conf_syntax_in_the_toml_is_named_as_such(
    tmp_path: Path, text: str, hint: str | None
) -> None:
    """A strongSwan operator writes ``proposals = aes128gcm16-...`` (no quotes) or a
    ``local { auth = psk }`` block out of habit: the error was tomllib's alone ("Invalid
    value (at line 3, column 13)"). It now says what swanctl.conf does that TOML does not."""
    f = tmp_path / "gw.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as ei:
        config.load(f)
    msg = str(ei.value)
    assert msg.startswith(f"{f}: not valid TOML: ") and "(at line " in msg, msg
    if hint is None:
        assert "swanctl" not in msg.split(": not valid TOML: ")[1], msg
    else:
        assert hint in msg, msg
