"""Cluster-unique SPIs (issue 9): blocks of the SPI space, [cluster] configuration, and a
reassignment on a collision drawn from the receiving member's block."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipsecct.ct import cxtp
from ipsecct.ct.transfer import ConflictPolicy, Settings
from ipsecct.errors import ConfigError
from ipsecct.gateway import config as gcfg
from ipsecct.ipsec import spi
from tests.helpers.config_files import GOOD, write
from tests.helpers.transfer import SPI_UP, World, collide


@given(count=st.integers(1, spi.MAX_BLOCKS), data=st.data())
def test_blocks_are_disjoint_and_cover_the_space(count: int, data: st.DataObject) -> None:
    i = data.draw(st.integers(0, count - 1))
    b = spi.block(i, count)
    assert b.first >= spi.SPI_MIN and b.last <= spi.SPI_MAX
    if i > 0:
        assert spi.block(i - 1, count).last + 1 == b.first
    if i < count - 1:
        assert b.last + 1 == spi.block(i + 1, count).first
    else:
        assert b.last == spi.SPI_MAX
    assert spi.block(0, count).first == spi.SPI_MIN
    x = data.draw(st.integers(b.first, b.last))
    assert x in b and spi.index_of(x, count) == i


def test_block_errors_and_ranges() -> None:
    with pytest.raises(ValueError):
        spi.block(2, 2)
    with pytest.raises(ValueError):
        spi.block(0, 0)
    assert spi.parse_range("0x100-0x1ff") == spi.SpiBlock(0x100, 0x1FF)
    for bad in ("0x100", "1-2", "0x200-0x100", "a-b"):
        with pytest.raises(ValueError):
            spi.parse_range(bad)
    b = spi.SpiBlock(0x1000, 0x1003)
    assert {next(iter(b.candidates())) for _ in range(200)} <= {0x1000, 0x1001, 0x1002, 0x1003}


def test_cluster_config(tmp_path: Path) -> None:
    # GOOD's tunnel receives on 0x10000001: block 1 of 16 (0x10000010..) does not hold it,
    # block 0 does.
    cfg = gcfg.load(write(tmp_path, GOOD + "\n[cluster]\nspi_block = 0\n"))
    assert cfg.cluster is not None
    blk = cfg.cluster.block()
    assert blk == spi.block(0, 16) and 0x10000001 not in spi.block(1, 16)
    with pytest.raises(ConfigError, match=r"cluster\.spi_block.*outside"):
        gcfg.load(write(tmp_path, GOOD + "\n[cluster]\nspi_block = 1\nspi_blocks = 2\n"))
    for bad, key in (
        ("spi_block = 16", "cluster.spi_block"),
        ("spi_blocks = 0", "cluster.spi_blocks"),
        ("spi_block = true", "cluster.spi_block"),
        ("colour = 1", "cluster.colour"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            gcfg.load(write(tmp_path, GOOD + f"\n[cluster]\n{bad}\n"))


@pytest.mark.parametrize("index", [0, 5, 15])
def test_reassigned_spi_comes_from_the_targets_block(index: int) -> None:
    blk = spi.block(index, 16)
    w = World(settings={"sg2": Settings(conflict=ConflictPolicy.REASSIGN, spi_block=blk)})
    collide(w, "sg2", SPI_UP)
    w.transfer()
    w.deliver("sg1", "sg2")
    ctdr = w.peek("sg2", "sg1")
    assert isinstance(ctdr, cxtp.CTDR)
    assert [e.status for e in ctdr.statuses] == [cxtp.Status.ACCEPTED_SPI_REASSIGNED]
    w.deliver_all()
    (t2,) = [t for t in w.gw["sg2"].engine.tunnels() if t.name == "mn1"]
    assert t2.inbound is not None and t2.inbound.spi in blk


def test_a_full_block_refuses_instead_of_spinning() -> None:
    w = World(
        settings={
            "sg2": Settings(conflict=ConflictPolicy.REASSIGN, spi_block=spi.SpiBlock(0x777, 0x777))
        }
    )
    collide(w, "sg2", SPI_UP)
    # The one SPI of the block is taken too.
    collide(w, "sg2", 0x777, peer="192.0.2.98")
    w.transfer()
    w.deliver("sg1", "sg2")
    ctdr = w.peek("sg2", "sg1")
    assert isinstance(ctdr, cxtp.CTDR)
    assert [e.status for e in ctdr.statuses] == [cxtp.Status.SPI_COLLISION]
