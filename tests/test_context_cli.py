"""`ipsecct context encode|decode`, run as a separate process like a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples" / "contexts").glob("*.json"))
SECRET_HEX = "5ec2e75ec2e75ec2e75ec2e75ec2e75e"


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "ipsecct", "context", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


def assert_one_line_error(p: subprocess.CompletedProcess[bytes], *needles: str) -> None:
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert p.stdout == b""
    assert err.count("\n") == 1 and err.startswith("ipsecct: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_round_trip(path: Path, tmp_path: Path) -> None:
    enc = run("encode", str(path))
    assert enc.returncode == 0, enc.stderr
    lines = enc.stdout.decode().splitlines()
    assert len(lines) == 1 and all(c in "0123456789abcdef" for c in lines[0])
    assert len(lines[0]) % 16 == 0  # whole 8-octet units
    assert lines[0].startswith("8001")  # FPT_IPSEC_SA
    dec = run("decode", "-", stdin=enc.stdout)
    assert dec.returncode == 0, dec.stderr
    assert json.loads(dec.stdout) == json.loads(path.read_text())
    assert dec.stdout.decode() == path.read_text()  # indented exactly like the examples
    again = run("encode", "-", stdin=dec.stdout)
    assert again.stdout == enc.stdout


def test_decode_tolerates_whitespace() -> None:
    hexline = run("encode", str(EXAMPLES[0])).stdout.decode().strip()
    spaced = "  " + "\n".join(hexline[i : i + 32] for i in range(0, len(hexline), 32)) + "\n\t "
    spaced = spaced[:10] + " " + spaced[10:]
    dec = run("decode", "-", stdin=spaced.encode())
    assert dec.returncode == 0, dec.stderr
    assert json.loads(dec.stdout) == json.loads(EXAMPLES[0].read_text())


@pytest.mark.parametrize(
    ("stdin", "needle"),
    [
        (b"zz", "not hex"),
        (b"", "no hex digits"),
        (b"800", "odd number"),
        (b"0001010000000000", "unknown FPT 0x0001"),
        (b"8001000000000000", "bad CDB length 0"),
        (b"800102800000", "truncated"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_decode_errors(stdin: bytes, needle: str) -> None:
    assert_one_line_error(run("decode", "-", stdin=stdin), needle)


def test_decode_refuses_two_cdbs_without_lines() -> None:
    one = run("encode", str(EXAMPLES[0])).stdout
    assert_one_line_error(run("decode", "-", stdin=one + one), "trailing octets")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{", "invalid JSON"),
        ("[]", "must be a JSON object"),
        ('{"spi": NaN}', "not a JSON number"),
        ('{"spi": 1, "spi": 2}', "duplicate field 'spi'"),
        ("[" * 100000 + "]" * 100000, "invalid JSON"),
        ('{"spi": ' + "9" * 5000 + "}", "invalid JSON"),
    ],
)
def test_encode_json_errors(text: str, needle: str) -> None:
    assert_one_line_error(run("encode", "-", stdin=text.encode()), needle)


def test_encode_errors_name_the_field_and_hide_the_key() -> None:
    obj = json.loads(next(p for p in EXAMPLES if "gcm" in p.name).read_text())
    obj["enc_key"] = SECRET_HEX + "00"  # 17 octets: no AES-GCM key is that long
    p = run("encode", "-", stdin=json.dumps(obj).encode())
    assert_one_line_error(p, "takes a key of", "not 17")
    assert SECRET_HEX[:8] not in p.stderr.decode()
    obj["enc_key"] = "not hex at all"
    assert_one_line_error(run("encode", "-", stdin=json.dumps(obj).encode()), "'enc_key'")


def test_missing_file_and_usage() -> None:
    assert_one_line_error(run("decode", "/nonexistent/ctx.hex"), "/nonexistent/ctx.hex")
    p = run()
    assert p.returncode == 2 and b"usage" in p.stderr


def test_lines_decode_processes_every_line() -> None:
    hexes = [run("encode", str(p)).stdout.decode().strip() for p in EXAMPLES]
    bad = hexes[0][:-16]  # one unit short: the length says more
    stdin = "\n".join([hexes[0], bad, "", "xyz", *hexes[1:]]) + "\n"
    p = run("decode", "--lines", "-", stdin=stdin.encode())
    assert p.returncode == 2
    out = p.stdout.decode().splitlines()
    assert len(out) == 4 + len(hexes) - 1
    assert json.loads(out[0]) == json.loads(EXAMPLES[0].read_text())
    assert out[1].startswith("error: truncated CDB")
    assert out[2] == "error: no hex digits in the input"
    assert out[3].startswith("error: the input is not hex")
    for line, path in zip(out[4:], EXAMPLES[1:], strict=True):
        assert json.loads(line) == json.loads(path.read_text())
    assert all(" " not in line or line.startswith("error:") for line in out if '"name"' not in line)
    assert p.stderr == b""


def test_lines_all_good_and_pipeline_round_trip() -> None:
    objs = [json.dumps(json.loads(p.read_text())) for p in EXAMPLES]
    enc = run("encode", "--lines", "-", stdin=("\n".join(objs) + "\n").encode())
    assert enc.returncode == 0, enc.stdout
    hexes = enc.stdout.decode().splitlines()
    assert len(hexes) == len(EXAMPLES)
    dec = run("decode", "--lines", "-", stdin=enc.stdout)
    assert dec.returncode == 0
    assert [json.loads(x) for x in dec.stdout.decode().splitlines()] == [
        json.loads(p.read_text()) for p in EXAMPLES
    ]
    again = run("encode", "--lines", "-", stdin=dec.stdout)
    assert again.returncode == 0 and again.stdout == enc.stdout


def test_lines_encode_reports_errors_per_line() -> None:
    good = json.dumps(json.loads(EXAMPLES[0].read_text()))
    stdin = "\n".join([good, "{}", '{"spi": 5}', good]).encode()
    p = run("encode", "--lines", "-", stdin=stdin)
    assert p.returncode == 2
    out = p.stdout.decode().splitlines()
    assert len(out) == 4
    assert out[0] == out[3] and not out[0].startswith("error")
    assert out[1] == "error: missing field 'spi'"
    assert out[2].startswith("error: field 'spi'")


def test_lines_split_on_newlines_only() -> None:
    obj = json.loads(EXAMPLES[0].read_text())
    obj["name"] = "a\u2028b\x85c"
    line = json.dumps(obj, ensure_ascii=False)
    assert "\u2028" in line
    p = run("encode", "--lines", "-", stdin=(line + "\r\n" + line + "\n").encode())
    assert p.returncode == 0, p.stdout
    out = p.stdout.decode().splitlines()
    assert len(out) == 2 and out[0] == out[1]
    dec = run("decode", "--lines", "-", stdin=p.stdout)
    assert json.loads(dec.stdout.decode().split("\n")[0])["name"] == "a\u2028b\x85c"


def test_the_json_example_of_the_docs_encodes_and_round_trips() -> None:
    """docs/context-format.md's JSON example, copied as it stands, is a context: it had
    "integ_key": "000102...1f" (refused: not hex)."""
    import re

    doc = (Path(__file__).parent.parent / "docs" / "context-format.md").read_text()
    (block,) = re.findall(r"```json\n(.*?)```", doc, re.S)
    enc = run("encode", "-", stdin=block.encode())
    assert enc.returncode == 0, enc.stderr
    dec = run("decode", "-", stdin=enc.stdout)
    assert dec.returncode == 0, dec.stderr
    back = json.loads(dec.stdout)
    assert back["integ_key"] == json.loads(block)["integ_key"] and back["seq"] == 48213
