"""`ipsecct bench ikev2` (root, strongSwan): one round of each method prints the documented JSON,
and context transfer costs the client no key exchange and no IKE message (no timing checks)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import strongswan

needs_strongswan = pytest.mark.skipif(not strongswan.available(), reason=strongswan.skip_reason())


@pytest.mark.root
@pytest.mark.slow
@needs_strongswan
def test_ikev2_bench_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ipsecct", "bench", "ikev2", "--json", "--rounds", "1",
         "--time", "2"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in json.loads(proc.stdout)["results"]}
    assert sorted(rows) == ["ct-direct", "ct-indirect", "strongswan-redirect",
                            "strongswan-reinitiate"]  # fmt: skip
    for row in rows.values():
        assert list(row)[:5] == ["method", "interrupt_ms", "lost", "mn_ike_messages",
                                 "key_exchanges"]  # fmt: skip
        assert isinstance(row["interrupt_ms"], float) and row["interrupt_ms"] > 0
        assert all(isinstance(row[k], int) and row[k] >= 0
                   for k in ("lost", "mn_ike_messages", "key_exchanges"))  # fmt: skip
    # the context transfer: the client does nothing, computes nothing
    assert rows["ct-indirect"]["key_exchanges"] == 0
    assert rows["ct-indirect"]["mn_ike_messages"] == 0
    # direct identity: sg2's INFORMATIONAL (MOBIKE address list) and, with kernel-libipsec,
    # one CHILD rekey (CREATE_CHILD_SA without PFS, and the old CHILD SA's DELETE)
    assert rows["ct-direct"]["key_exchanges"] == 0
    assert 2 <= rows["ct-direct"]["mn_ike_messages"] <= 6, rows["ct-direct"]
    # strongSwan's ways start over: a new IKE_SA_INIT (a key exchange) and IKE messages
    for m in ("strongswan-redirect", "strongswan-reinitiate"):
        assert rows[m]["key_exchanges"] >= 1 and rows[m]["mn_ike_messages"] >= 4, rows[m]


def test_ikev2_bench_refuses_a_short_stream() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ipsecct", "bench", "ikev2", "--time", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "at least 2 seconds" in proc.stderr
    assert "Traceback" not in proc.stderr


LOG = """\
20:49:19.498 08[ENC] generating IKE_SA_INIT request 0 [ SA KE No N(NATD_S_IP) N(NATD_D_IP) ]
20:49:19.498 08[NET] sending packet: from 192.168.20.10[500] to 192.168.20.2[500] (232 bytes)
20:49:19.525 09[NET] received packet: from 192.168.20.2[500] to 192.168.20.10[500] (208 bytes)
20:49:19.525 09[ENC] parsed IKE_SA_INIT response 0 [ SA KE No N(NATD_S_IP) N(NATD_D_IP) ]
20:49:20.001 10[ENC] parsed CREATE_CHILD_SA request 2 [ SA No KE TSi TSr ]
20:49:20.002 10[ENC] generating CREATE_CHILD_SA response 2 [ SA No KE TSi TSr ]
20:49:21.001 11[ENC] generating CREATE_CHILD_SA request 3 [ N(REKEY_SA) SA No TSi TSr ]
20:49:21.002 11[IKE] sending keep alive to 192.168.20.2[4500]
"""


def test_client_figures_from_a_strongswan_log() -> None:
    from ipsecct.bench.ikev2 import _client_figures

    # two packets; an IKE_SA_INIT and a CREATE_CHILD_SA with KE are key exchanges, a CHILD
    # rekey without KE and a NAT keep-alive are not
    assert _client_figures(LOG) == (2, 2)
    assert _client_figures("") == (0, 0)
