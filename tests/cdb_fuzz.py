"""Fuzz corpus for the C context reader and writer (``ipsecct.ct._cdb``), run by
test_cdb_asan.py in a Python process where the extension was built with AddressSanitizer.

Usage: python cdb_fuzz.py PATH_TO_CDB_SO [ROUNDS]. ``read`` and ``decode`` (which builds the SA)
take untrusted octets from a peer:
they get the sample contexts, every truncation and single-bit flip of them, random bodies behind
a valid header, rewritten length octets and random bytes; the verdicts of the reader decode uses
(this build plus the algorithm tables) must be the Python reader's. ``write`` gets the sample
SAs and the same SAs with fields a writer must refuse.
Deterministic (seeded): a failure reproduces. Runs with IPSECCT_PURE_PYTHON=1, so that the
rest of ipsecct uses its Python paths and only this build of the extension is loaded.
"""

from __future__ import annotations

import ipaddress
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipsecct.ct import context
from ipsecct.ipsec.sad import Counters, Lifetime, UdpEncap
from ipsecct.ipsec.spd import AddressRange, Selectors
from tests.helpers import asan
from tests.helpers.contexts import NOW, sample_sas


def main() -> None:
    cdb = asan.load("ipsecct.ct._cdb", sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    assert not context.NATIVE_READER, "run with IPSECCT_PURE_PYTHON=1"
    rng = random.Random(11)
    context._setup_native(cdb)
    context._cdb = cdb  # _read_native and _write_native call this build
    sas = sample_sas()
    good = [context.encode(sa, NOW) for sa in sas]

    def verdict(data: bytes) -> None:
        # (read() checks the layout; _read_native adds the algorithm tables, as decode does)
        cdb.read(data)
        fast = context._read_native(data, NOW)
        assert (fast is None) == (context._read_python(data, NOW) is None), data.hex()

    for data in good:
        verdict(data)
        for cut in range(len(data)):
            verdict(data[:cut])
        for i in range(len(data) * 8):
            b = bytearray(data)
            b[i // 8] ^= 0x80 >> (i % 8)
            verdict(bytes(b))
    for _ in range(rounds):
        base = bytearray(rng.choice(good))
        kind = rng.randrange(4)
        if kind == 0:  # random body behind a valid header
            body = rng.randbytes(rng.randrange(0, 64) * 8 + rng.randrange(0, 24))
            data = bytes(base[:24]) + body
        elif kind == 1:  # a length octet that lies
            base[2] = rng.randrange(256)
            data = bytes(base)
        elif kind == 2:  # random octets overwritten
            for _ in range(rng.randrange(1, 6)):
                base[rng.randrange(len(base))] = rng.randrange(256)
            data = bytes(base)
        else:  # random bytes
            data = rng.randbytes(rng.randrange(0, 300))
        verdict(data)
    # The writer: every sample, then fields it must refuse.
    r_ = AddressRange(ipaddress.ip_address("10.0.0.0"), ipaddress.ip_address("10.0.0.9"))
    breakers = [
        ("created", NOW + 1), ("created", math.nan), ("soft", Lifetime(math.inf)),
        ("hard", Lifetime(None, None, 1 << 64)), ("pmtu_expires", math.nan),
        ("encap", UdpEncap(0, 4500)), ("encap", UdpEncap(4500, 1 << 40)), ("seq", -1),
        ("seq", 1 << 70), ("counters", Counters(-1, 0)), ("counters", Counters(0, 1 << 64)),
        ("replay_window", 1 << 40), ("replay_window", -32), ("spi", 1 << 33),
        ("path_mtu", 1 << 20), ("enc_key", bytes(300)),
        ("selectors", Selectors((r_,), (r_,), label=bytes(200))),
    ]  # fmt: skip
    for _ in range(max(1, rounds // 20)):
        for sa in sample_sas():
            assert context._write_native(sa, NOW) == context._write_python(sa, NOW)
            attr, value = rng.choice(breakers)
            object.__setattr__(sa, attr, value)
            try:
                expected = context._write_python(sa, NOW)
            except Exception:  # the Python writer may raise where C says no: both refuse
                expected = None
            assert context._write_native(sa, NOW) == expected, (attr, value)
    print("fuzz-ok")


if __name__ == "__main__":
    main()
