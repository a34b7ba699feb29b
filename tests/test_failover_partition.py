"""Issue 9's defect, as an operator met it, as a test: examples/failover in a network namespace,
a steady stream through sg1, the TLS channel between sg1 and sg2 cut with an nftables rule
while both stay up. With fencing: not one (SPI, sequence number) pair on the wire from both
gateways, no ICV (or replay) drop at the MN, and the isolated sg1 stops sending within its
lease and says so (status, metrics, log). The scenario runs in tests/failover_partition.py.

In the etcd mode (both gateways on a one-member etcd in the namespace) the rule cuts sg1 from
etcd instead: sg1 stops within its fence, sg2 takes over once etcd expired sg1's lease, and
again not one pair is sent by both."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.netns import Namespaces, have_root

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.mark.parametrize("mode", ["pair", "etcd"])
def test_partition_between_the_pair_reuses_no_nonce(tmp_path: Path, mode: str) -> None:
    assert have_root(), "needs root (network namespaces, nftables)"
    for tool in ("nft", "tcpdump"):
        assert shutil.which(tool), f"{tool} is missing: run scripts/install"
    with Namespaces("pair") as ns:
        r = subprocess.run(
            ns.cmd(
                "pair",
                sys.executable,
                str(ROOT / "tests" / "failover_partition.py"),
                str(tmp_path),
                mode,
            ),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout)
    wire = out["wire"]
    sg1 = {(spi, seq) for spi, seq, _ in wire["sg1"]}
    sg2 = {(spi, seq) for spi, seq, _ in wire["sg2"]}
    assert len(sg1) > 1000 and len(sg2) > 500  # both really sent, before and after the cut
    assert not sg1 & sg2, sorted(sg1 & sg2)[:10]
    # Neither repeated a pair by itself either.
    assert len(sg1) == len(wire["sg1"]) and len(sg2) == len(wire["sg2"])
    # The MN: every packet verified, none a replay.
    assert out["mn_drops"]["icv"] == 0 and out["mn_drops"]["replay"] == 0, out["mn_drops"]
    # The isolated sg1 stopped within its lease of the cut (the lease runs from a heartbeat
    # sent before the cut), plus scheduling slack; and sg2 started only after it stopped.
    last_sg1 = max(ts for _, _, ts in wire["sg1"])
    first_sg2 = min(ts for _, _, ts in wire["sg2"])
    lease_s = out["lease_ms"] / 1000
    assert last_sg1 - out["cut_at"] <= lease_s + 0.1, (last_sg1 - out["cut_at"], lease_s)
    assert first_sg2 > last_sg1
    # ... and at its lease's end itself (not at a later tick): its last ESP on the wire is no
    # later than the end plus the guard (50 ms: from the check to the capture), the end as
    # sg1's status put it (the status round trip widens it, never narrows it).
    early, late = out["lease_end_between"]
    assert last_sg1 <= late + 0.05, (last_sg1 - early, late - early)
    print(
        f"sg1 sent {len(sg1)}, sg2 sent {len(sg2)}, common 0; sg1 stopped "
        f"{(last_sg1 - out['cut_at']) * 1000:.0f} ms after the cut (lease {out['lease_ms']} ms),"
        f" its last ESP {(last_sg1 - early) * 1000:+.1f} ms from its lease's end (status read "
        f"in {(late - early) * 1000:.1f} ms); sg2 first sent "
        f"{(first_sg2 - last_sg1) * 1000:.0f} ms after that"
    )
    # And said so: status, and a WARNING in the log.
    assert out["sg1_status_when_lost"]["lease"]["state"] == "lost"
    assert out["sg1_status_when_lost"]["lease"]["losses"] >= 1
    lost = "event=lease-lost" if mode == "pair" else "event=cluster-lease-lost"
    assert lost in out["sg1_log"] and "stopped sending" in out["sg1_log"]
    if mode == "pair":
        assert out["sg2_status"]["role"] == "took over"
        assert out["sg2_status"]["lease"]["state"] == "taken over"
        # The taker's epoch is on disk, in its state directory, before it sent anything.
        epoch = json.loads((tmp_path / "state" / "sg2" / "failover-epoch.json").read_text())
        assert epoch == {"epoch": 2, "took_over": True}
    else:
        assert out["sg2_status"]["taken_over"] == 1 and out["sg2_status"]["owned_tunnels"] == 1
