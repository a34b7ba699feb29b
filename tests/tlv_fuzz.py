"""Fuzz corpus for the IKE SA context's C scanner (``ipsecct.ikev2._tlv``), run by
test_tlv_asan.py in a Python process where the extension was built with AddressSanitizer.

Usage: python tlv_fuzz.py PATH_TO_TLV_SO [ROUNDS]. ``scan`` takes untrusted octets from a
peer gateway: it gets the sample contexts' CDBs, every truncation and single-bit flip of
them, random items behind a valid header, rewritten length octets and random bytes; its
verdicts must be the Python scanner's (``context._scan``). Deterministic (seeded). Runs
with IPSECCT_PURE_PYTHON=1, so that only this build of the extension is loaded.
"""

from __future__ import annotations

import random
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipsecct.ikev2 import context
from tests.helpers import asan
from tests.helpers.ikev2_engines import connect, pair


def main() -> None:
    tlv = asan.load("ipsecct.ikev2._tlv", sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    assert not context.NATIVE_SCAN, "run with IPSECCT_PURE_PYTHON=1"
    rng = random.Random(11)
    w = pair()
    connect(w)
    good = context.encode(w.resp.ike_sas()[0], 0.0)

    def verdict(data: bytes) -> None:
        assert tlv.scan(data) == context._scan(data), data.hex()

    for cdb in good:
        for n in range(len(cdb) + 1):
            verdict(cdb[:n])
        for bit in range(len(cdb) * 8):
            b = bytearray(cdb)
            b[bit // 8] ^= 1 << (bit % 8)
            verdict(bytes(b))
    for _ in range(rounds):
        body = b"".join(struct.pack("!BH", rng.randrange(4), n) + rng.randbytes(n)
                        for n in (rng.randrange(6) for _ in range(rng.randrange(8))))  # fmt: skip
        body = body[: rng.randrange(len(body) + 1)] if rng.random() < 0.3 else body
        units = (4 + len(body) + 7) // 8 if rng.random() < 0.8 else rng.randrange(256)
        cdb = struct.pack("!HBB", 0x8011, units, 0) + body
        verdict(cdb + bytes(max(0, units * 8 - len(cdb))))
        verdict(cdb)
        verdict(rng.randbytes(rng.randrange(64)))
        b = bytearray(rng.choice(good))
        b[rng.randrange(len(b))] = rng.randrange(256)
        verdict(bytes(b))
    print("fuzz-ok")


if __name__ == "__main__":
    main()
