"""What an operator may mistype and an attacker may hand the command line: files that never
end or never open, settings that would busy-loop. Each is one line on stderr and a non-zero
exit status, at once (a hang is a failure: every command here runs under a time-out)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipsecct", *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=stdin,
    )


def one_line(r: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    p = tmp_path / "fifo.toml"
    os.mkfifo(p)
    return p


@pytest.fixture
def huge(tmp_path: Path) -> Path:
    p = tmp_path / "huge.toml"
    with open(p, "wb") as f:
        f.truncate(200 << 20)  # sparse: costs no disk
    return p


@pytest.mark.parametrize("what", ["/dev/zero", "/dev/urandom", "fifo", "huge", "dir"])
@pytest.mark.parametrize("command", [["gateway", "run"], ["status"], ["sa", "list"]])
def test_a_configuration_that_is_not_a_bounded_regular_file_is_refused_at_once(
    what: str, command: list[str], fifo: Path, huge: Path, tmp_path: Path
) -> None:
    """``-c /dev/zero`` (or a FIFO nobody writes to, or a huge file) made every command read
    or block forever."""
    path = {"fifo": str(fifo), "huge": str(huge), "dir": str(tmp_path)}.get(what, what)
    line = one_line(run(*command, "-c", path))
    assert path in line
    assert ("larger than 16 MiB" if what == "huge" else
            "is a directory" if what == "dir" else "not a regular file") in line  # fmt: skip


@pytest.mark.parametrize("key", ["keys", "secret"])
def test_a_key_file_that_never_ends_is_refused(key: str, tmp_path: Path, fifo: Path) -> None:
    """A tunnel's key file or an IKE secret named as /dev/zero or a FIFO."""
    for name in ("sg1.toml", "keys"):
        src = ROOT / "examples" / ("gateway" if key == "keys" else "ikev2") / name
        if src.is_dir():
            shutil.copytree(src, tmp_path / name)
        else:
            shutil.copy(src, tmp_path / name)
    f = tmp_path / "sg1.toml"
    text = f.read_text()
    for target in ("/dev/zero", str(fifo)):
        if key == "keys":
            new = text.replace('keys = "keys/sg1-mn.keys"', f'keys = "{target}"')
        else:
            new = text.replace('file = "keys/ike.psk"', f'file = "{target}"')
        assert new != text
        f.write_text(new)
        line = one_line(run("gateway", "run", "-c", str(f)))
        assert f"{target}: not a regular file" in line


@pytest.mark.parametrize(
    "command",
    [
        ["context", "decode", "/dev/zero"],
        ["context", "encode", "/dev/urandom"],
        ["pki", "show", "/dev/zero"],
        ["pcap", "decrypt", "--keys", "/dev/zero", "/dev/null", "/dev/null"],
    ],
)
def test_input_files_that_never_end_are_refused(command: list[str]) -> None:
    assert "not a regular file: /dev/" in one_line(run(*command))


def test_endless_standard_input_is_cut_off() -> None:
    with open("/dev/zero", "rb") as zero:
        line = one_line(run("context", "decode", "-", stdin=zero.fileno()))
    assert "larger than 64 MiB" in line
