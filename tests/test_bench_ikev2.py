"""`ipsecct bench ikev2` (root, strongSwan): one round of each method prints the documented JSON,
and context transfer costs the client no key exchange and no IKE message (no timing checks)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.helpers.strongswan import needs_strongswan


@pytest.fixture(scope="module")
def bench_rows() -> dict[str, dict[str, Any]]:
    """One round of every method (the default set), run once for the tests below."""
    proc = subprocess.run(
        [sys.executable, "-m", "ipsecct", "bench", "ikev2", "--json", "--rounds", "1",
         "--time", "2"],
        capture_output=True, text=True, timeout=360, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return {r["method"]: r for r in json.loads(proc.stdout)["results"]}


@pytest.mark.root
@pytest.mark.slow
@needs_strongswan
def test_ikev2_bench_json(bench_rows: dict[str, dict[str, Any]]) -> None:
    rows = bench_rows
    assert sorted(rows) == ["ct-direct", "ct-direct-prepared", "ct-indirect",
                            "ct-indirect-prepared", "strongswan-redirect",
                            "strongswan-reinitiate"]  # fmt: skip
    for row in rows.values():
        assert list(row)[:5] == ["method", "interrupt_ms", "lost", "mn_ike_messages",
                                 "key_exchanges"]  # fmt: skip
        assert isinstance(row["interrupt_ms"], float) and row["interrupt_ms"] > 0
        assert all(isinstance(row[k], int) and row[k] >= 0
                   for k in ("lost", "mn_ike_messages", "key_exchanges"))  # fmt: skip
        # the figures below the 2 ms floor: signed, and a count
        assert isinstance(row["excess_ms"], float) and isinstance(row["delay_excess_ms"], float)
        assert isinstance(row["delayed"], int) and row["delayed"] >= 0
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


@pytest.mark.root
@pytest.mark.slow
@needs_strongswan
def test_ikev2_bench_prepared_rows(bench_rows: dict[str, dict[str, Any]]) -> None:
    """The prepared transfers (transfer --prepare ahead, the commit as the trigger) cost the
    client what the unprepared ones do, counted from the preparation on, and report it."""
    ind, dire = bench_rows["ct-indirect-prepared"], bench_rows["ct-direct-prepared"]
    assert ind["key_exchanges"] == 0 and ind["mn_ike_messages"] == 0, ind
    assert dire["key_exchanges"] == 0 and 2 <= dire["mn_ike_messages"] <= 6, dire
    for row in (ind, dire):
        assert isinstance(row["prepare_ms"], float) and row["prepare_ms"] > 0, row
        assert isinstance(row["prepare_gap_ms"], float) and row["prepare_gap_ms"] >= 2.0, row
    for m in ("ct-indirect", "ct-direct", "strongswan-redirect", "strongswan-reinitiate"):
        assert bench_rows[m]["prepare_ms"] is None and bench_rows[m]["prepare_gap_ms"] is None


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


def test_figures_windows_and_the_figures_below_the_floor() -> None:
    """The windows: every method's baseline ends at the same time, where a prepared run's
    preparation starts, the interrupt starts at the trigger (a prepared run's commit) and is
    as long as the baseline;
    excess_ms and the delays resolve what the 2 ms floor of interrupt_ms hides."""
    from ipsecct.bench.ikev2 import _figures
    from ipsecct.errors import BenchError

    # arrival gaps (start, end) and [arrival, one-way delay]; prepare at 10, commit at 20
    outs = [
        {"gaps": [[1.0, 1.0016], [12.0, 12.009], [20.5, 20.5018]],
         "delays": [[1.0, 0.0004], [12.0, 0.0009], [20.5, 0.0012], [20.6, 0.0003]]},
        {"gaps": [[3.0, 3.0013], [25.0, 25.0019]],
         "delays": [[3.0, 0.0005], [25.0, 0.0007]]},
    ]  # fmt: skip
    r = _figures("ct-indirect-prepared", outs, 0.0, 20.0, 10.0, 10.0, 0, 0, 0, prepare_ms=9.0)
    # no gap above 2 ms on either side of the handover: the floor, as ever
    assert (r.interrupt_ms, r.baseline_ms) == (2.0, 2.0)
    # the 9 ms gap while prepared is its own figure, not the baseline's nor the interrupt's
    assert r.prepare_gap_ms == 9.0 and r.prepare_ms == 9.0
    assert r.excess_ms == 0.3  # 1.9 ms after the commit against 1.6 ms before the prepare
    assert r.delay_excess_ms == 0.7  # 1.2 ms against 0.5 ms
    assert r.delayed == 2  # 1.2 and 0.7 ms; 0.3 ms is within the baseline's
    # unprepared: the same baseline window (not up to the trigger: a longer window would
    # take the 9 ms gap and lower the excess), the same figures; the time between the
    # baseline's end and the trigger counts nowhere
    r = _figures("ct-indirect", outs, 0.0, 20.0, 10.0, None, 0, 0, 0)
    assert (r.baseline_ms, r.prepare_gap_ms, r.prepare_ms) == (2.0, None, None)
    assert r.excess_ms == 0.3 and r.delay_excess_ms == 0.7 and r.delayed == 2
    # the handover's window is as long as the baseline (10 s from the stream's start at 0):
    # a gap and a delay 10 s or more after the trigger count nowhere
    outs[1]["gaps"].append([30.0, 30.05])
    outs[1]["delays"].append([30.05, 0.05])
    r = _figures("ct-indirect", outs, 0.0, 20.0, 10.0, None, 0, 0, 0)
    assert r.interrupt_ms == 2.0 and r.excess_ms == 0.3 and r.delayed == 2
    # a preparation cannot start before the baseline's end
    with pytest.raises(BenchError):
        _figures("ct-indirect-prepared", outs, 0.0, 20.0, 11.0, 10.0, 0, 0, 0, prepare_ms=9.0)
