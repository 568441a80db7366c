"""DDP with two CPU processes (gloo): both ranks train the pair and finish with identical weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from background import REPO, Command, Job, job


@job(seconds=15)
def ddp_pair(tmp: Path) -> list[list[Command]]:
    """tests/scripts/ddp_pair.py: one epoch of an MLP pair on two DDP ranks."""
    return [[Command("fit", [str(REPO / "tests/scripts/ddp_pair.py"), str(tmp)])]]


@pytest.mark.ddp
@pytest.mark.background(factory=ddp_pair)
def test_ddp_pair_fit_on_two_cpu_processes_ends_with_identical_weights(background: Job, fmnist: Path) -> None:
    background.check()
    tmp_path = background.dir
    stderr = background.stderr("fit")
    rows = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    (before0, after0, acc_a0, acc_b0, world, train0), (before1, after1, acc_a1, acc_b1, _, train1) = rows
    assert world == "2"
    assert before0 == before1  # same initialization on both ranks
    assert after0 == after1  # gradients all-reduced: identical weights after training
    assert after0 != before0  # and it did train
    assert acc_a0 == acc_a1 and acc_b0 == acc_b1  # validation metrics synced across ranks
    assert train0 == train1  # epoch-level training metrics reduced over ranks (each rank saw other batches)
    assert "sync_dist" not in stderr  # Lightning's warning about unsynced epoch-level metrics
    assert float(acc_a0) > 0.3 and float(acc_b0) > 0.3


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
