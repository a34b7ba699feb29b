"""What one certificate's revocation check costs an authentication (on the event loop), with
a CA's list of N revoked serials: the library's own lookup (a scan of the list) and
signature check (a hash of the whole list) on every authentication, against the index
``ikev2.auth.revocation_index`` makes once per list (on the gateway's reader thread).

    .venv/bin/python -m benchmarks.crl_check 60000

Prints the list's size, the CPU time (``time.thread_time``) of making the index, and the
medians over alternated runs of one check each way.
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ipsecct.ikev2 import auth


def make(
    n: int,
) -> tuple[x509.CertificateRevocationList, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(key.public_key()).serial_number(1).not_valid_before(now)
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))  # fmt: skip
    b = (x509.CertificateRevocationListBuilder().issuer_name(name).last_update(now)
         .next_update(now + dt.timedelta(days=1)))  # fmt: skip
    for i in range(n):
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(1000 + i).revocation_date(now).build()
        )
    return b.sign(key, hashes.SHA256()), ca, key


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    crl, ca, _ = make(n)
    size = len(crl.public_bytes(serialization.Encoding.DER))
    t = time.thread_time()
    rl = auth.revocation_index(crl)
    index_ms = (time.thread_time() - t) * 1000
    key = ca.public_key()
    serial = 10**9  # not revoked: the whole list is looked through

    def library() -> None:
        crl.is_signature_valid(key)  # type: ignore[arg-type]
        crl.get_revoked_certificate_by_serial_number(serial)

    def indexed() -> None:
        auth._not_revoked([ca], ca, [rl])

    old: list[float] = []
    new: list[float] = []
    for _ in range(9):
        for f, out in ((library, old), (indexed, new)):
            t = time.thread_time()
            f()
            out.append((time.thread_time() - t) * 1000)
    print(f"{n} serials, {size} octets: index {index_ms:.1f} ms once; per check: library "
          f"{statistics.median(old):.2f} ms, indexed {statistics.median(new):.3f} ms")


if __name__ == "__main__":
    main()
