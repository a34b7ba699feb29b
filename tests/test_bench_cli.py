"""`ipsecct bench codec` and `bench tunnel`: the commands run and print the documented JSON (no
timing checks)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ipsecct import cli
from ipsecct.bench import codec
from ipsecct.commands.bench import BENCHES
from ipsecct.errors import BenchError, ConfigError

TINY = ["--time", "0.001", "--rounds", "1"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipsecct", "bench", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )


def test_codec_json_schema() -> None:
    proc = _run("codec", "--json", *TINY)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert list(doc) == ["results"]
    rows = doc["results"]
    seen = set()
    for row in rows:
        assert list(row) == ["impl", "transform", "size", "op", "pps"]
        assert row["impl"] in ("ipsecct", "raw-aead", "scapy", "native")
        assert row["transform"] in ("aes-gcm-128", "chacha20-poly1305")
        assert row["size"] in (64, 1400)
        assert row["op"] in ("encrypt", "decrypt")
        assert isinstance(row["pps"], float) and row["pps"] > 0
        seen.add((row["impl"], row["transform"], row["size"], row["op"]))
    impls = (3 if codec.scapy_available() else 2) + (1 if codec.native_available() else 0)
    assert len(seen) == len(rows) == impls * 2 * 2 * 2  # every case, once


def test_codec_table_and_filters() -> None:
    proc = _run("codec", *TINY, "--impl", "ipsecct", "--impl", "raw-aead",
                "--transform", "aes-gcm-128", "--size", "64")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "ipsecct/raw" in lines[0] and "ipsecct/scapy" in lines[0]
    rows = [ln for ln in lines if ln.startswith("aes-gcm-128")]
    assert [r.split()[1:3] for r in rows] == [["64", "encrypt"], ["64", "decrypt"]]
    assert all(float(r.split()[6]) > 0 for r in rows)  # ipsecct/raw ratio
    assert all(r.split()[7] == "-" for r in rows)  # no Scapy measured: no ratio


@pytest.mark.parametrize(
    "args",
    [["codec", "--time", "0"], ["codec", "--rounds", "x"], ["codec", "--size", "65"],
     ["codec", "--impl", "nope"], []],
)
def test_bad_arguments_exit_2(args: list[str]) -> None:
    proc = _run(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr


def test_registry_and_in_process_measure() -> None:
    assert BENCHES["codec"] == "ipsecct.bench.codec"
    results = codec.measure(impls=["ipsecct", "raw-aead"], transforms=["chacha20-poly1305"],
                            sizes=[1400], run_time=0.001, rounds=1)
    assert {(r.impl, r.op) for r in results} == {
        ("ipsecct", "encrypt"), ("ipsecct", "decrypt"),
        ("raw-aead", "encrypt"), ("raw-aead", "decrypt"),
    }
    assert json.loads(codec.to_json(results))["results"][0]["transform"] == "chacha20-poly1305"


@pytest.mark.root
@pytest.mark.slow
def test_tunnel_json_schema() -> None:
    # The load generator at nice 0 and a whole second of measurement: at nice 19 on a loaded
    # machine it sent nothing within 0.3 s once, and the CPU time (read in 10 ms ticks) of a
    # gateway rounded to 0.0 once, and again with the whole second (a gateway the scheduler
    # gave less than one 10 ms tick in the window). This test is about the schema, not the
    # speed: a CPU figure is a number, never negative.
    proc = _run("tunnel", "--json", "--rounds", "1", "--time", "1.0", "--warmup", "0.3",
                "--nice", "0", "--size", "64")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["results"]
    assert sorted(r["impl"] for r in rows) == [
        "ipsecct", "ipsecct-batch", "ipsecct-nocoalesce", "ipsecct-python", "strongswan"
    ]
    for row in rows:
        assert list(row)[:4] == ["impl", "size", "pps", "us_per_packet"]
        assert row["size"] == 64 and row["pps"] > 0
        assert isinstance(row["us_per_packet"], float) and row["us_per_packet"] >= 0, row


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        (BenchError("the ipsecct gateway exited (bind: address in use)"), 1, "gateway exited"),
        (RuntimeError("first line\nsecond line"), 1, "RuntimeError: first line | second line"),
        (AssertionError("ipsecct dropped its own packets"), 1, "AssertionError: ipsecct"),
        (ConfigError("x.toml: outer.port: out of range"), 2, "x.toml: outer.port"),
    ],
)
def test_a_failing_benchmark_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: Exception,
    status: int,
    message: str,
) -> None:
    def fail(**kw: object) -> None:
        raise error

    monkeypatch.setattr(codec, "measure", fail)
    assert cli.main(["bench", "codec", *TINY]) == status
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("ipsecct: error")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


TERM_SCRIPT = """
import argparse, os, signal, sys, time
from ipsecct.bench.tunnel import Topology
from ipsecct.commands.bench import _one_line

def bench(args):
    with Topology("t") as topo:
        print(topo.a, topo.b, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # as a service manager or `timeout` stops it
        time.sleep(30)
    return 0

sys.exit(_one_line("tunnel", bench)(argparse.Namespace()))
"""


@pytest.mark.root
def test_a_root_bench_stopped_by_sigterm_deletes_its_namespaces() -> None:
    """``timeout 60 ipsecct bench tunnel`` (SIGTERM) left its ten network namespaces with
    their veth pairs behind, as SIGTERM ended Python without unwinding: a bench ends on
    SIGTERM as on Ctrl-C, through its clean-up, with status 143."""
    proc = subprocess.run([sys.executable, "-c", TERM_SCRIPT], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    names = proc.stdout.split()
    assert len(names) == 2 and proc.returncode == 128 + 15, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert not set(names) & {line.split()[0] for line in left.stdout.splitlines() if line}
