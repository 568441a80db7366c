"""Progress output: bars on a terminal only, one line per finished variant, silent when quiet or off rank 0."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
from vf_lightning.callbacks import MergeCallback

from vf_lightning import progress
from vf_lightning.cli import main
from vf_lightning.data import FashionMNISTDataModule
from vf_lightning.lit import OptimConfig, PairModule
from vf_lightning.models import ModelConfig


class Terminal(io.StringIO):
    """A text stream that says it is a terminal (tqdm draws bars only on those)."""

    def isatty(self) -> bool:
        return True


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines() -> Iterator[list[str]]:
    handler = Lines()
    level = progress.log.level
    progress.log.addHandler(handler)
    progress.set_quiet(False)
    try:
        yield handler.lines
    finally:
        progress.log.removeHandler(handler)
        progress.log.setLevel(level)


def test_a_step_draws_a_bar_on_a_terminal_and_logs_one_line_per_finished_variant(lines: list[str]) -> None:
    term = Terminal()
    with progress.configured(stream=term, prefix="epoch 2"), progress.steps("MergeCallback", 3) as bar:
        progress.status("statistics")
        bar.advance("weight/reset", acc=0.8125, loss=0.5)
        bar.advance()  # a point without a line of its own
        progress.advance("weight/none", acc=0.1)  # the innermost step, from library code
    drawn = term.getvalue()
    assert "epoch 2 MergeCallback" in drawn and "0/3" in drawn and "statistics" in drawn
    info = [x for x in lines if "acc" in x]
    assert info == ["epoch 2 MergeCallback: weight/reset  acc 0.8125  loss 0.5000 (1/3)",
                    "epoch 2 MergeCallback: weight/none  acc 0.1000 (3/3)"]  # fmt: skip
    assert progress.current() is None
    progress.advance("outside", acc=1.0)  # outside a step: nothing
    assert not any("outside" in x for x in lines)


def test_no_bar_off_a_terminal_or_with_lightnings_bar_disabled_but_the_lines_stay(lines: list[str]) -> None:
    plain = io.StringIO()
    with progress.configured(stream=plain), progress.steps("PruneCallback", 2) as bar:
        bar.advance("a/global_magnitude/0.5/none", acc=0.5)
    term = Terminal()
    with progress.configured(stream=term, bars=False), progress.steps("PruneCallback", 2) as bar:
        bar.advance("a/global_magnitude/0.9/none", acc=0.2)
    assert plain.getvalue() == "" and term.getvalue() == ""
    assert [x.split(":")[1].split()[0] for x in lines if "acc" in x] == ["a/global_magnitude/0.5/none",
                                                                         "a/global_magnitude/0.9/none"]


def test_quiet_and_other_ranks_show_neither_bars_nor_lines(lines: list[str]) -> None:
    term = Terminal()
    progress.set_quiet()
    with progress.configured(stream=term), progress.steps("MergeCallback", 2) as bar:
        bar.advance("weight/none", acc=0.5)
    progress.set_quiet(False)
    with progress.configured(stream=term, enabled=False), progress.steps("MergeCallback", 2) as bar:
        bar.advance("weight/none", acc=0.5)
        progress.info("not on rank 1")
    assert term.getvalue() == "" and lines == []


def test_vf_quiet_flag_is_taken_off_the_command_line_before_lightning_parses_it(lines: list[str]) -> None:
    with pytest.raises(SystemExit):
        main(["merge", "--quiet", "--help"])  # --help exits; --quiet must not be an unknown option
    assert progress.log.getEffectiveLevel() == logging.WARNING


def test_a_callback_reports_each_variant_with_its_accuracy_while_fit_validates(
    tmp_path: Path, fmnist: Path, lines: list[str]
) -> None:
    L.seed_everything(0)
    cb = MergeCallback(matchings=["weight"], normalizations=["reset"], calib_samples=64, eval_samples=64,
                       batch_size=64)  # fmt: skip
    data = FashionMNISTDataModule(num_workers=0, train_subset=64, val_subset=64, batch_size=64, pad_to_32=True,
                                  calib_samples=64, augment=False)  # fmt: skip
    tr = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=[cb], enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))  # fmt: skip
    net = ModelConfig(arch="mlp", norm="none", hidden=[16], in_channels=1, image_size=32, num_classes=10)
    tr.fit(PairModule(net, OptimConfig(lr=0.05)), data)
    acc = cb.last["merge/weight/reset/acc"]
    assert "[1 epochs] MergeCallback: running" in lines
    assert f"[1 epochs] MergeCallback: weight/reset  acc {acc:.4f}" in " ".join(lines)
    assert any(x.startswith("[1 epochs] MergeCallback: done in") for x in lines)
