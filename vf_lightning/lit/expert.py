"""Task experts: a zoo network whose body starts from a foundation checkpoint, with a fresh head for the task.

Training is LP-FT (nonlocal-spec §1.3): the first ``probe_epochs`` train only the head (the body runs under
``no_grad``, so it gets no gradient and no weight decay), then everything is fine-tuned. At the end of fit
the expert measures how far it moved (:meth:`ExpertModule.locality`: relative distance of its body from the
foundation's, and the loss barrier on the straight path from the linear-probe model — foundation body + probed
head — to the expert, on the data module's calibration data), logs it as ``expert/distance`` /
``expert/barrier`` and is exported as a standalone model checkpoint whose ``meta`` names its task, classes and
foundation (plus the locality numbers), which is what the multi-task merge
(:func:`vf_lightning.merge.multitask.merge_experts`) reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vf_lightning.checkpoint import CheckpointError, load_expert, save_model_checkpoint
from vf_lightning.lit.modules import ClassifierModule
from vf_lightning.lit.optim import OptimConfig, ScheduleConfig
from vf_lightning.merge.experts import head_name, loss_barrier, path_losses, relative_distance
from vf_lightning.models import ModelConfig


def foundation_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of a foundation: a vf model checkpoint or a ClassifierModule ``.ckpt`` (see :func:`load_expert`)."""
    model, _, _ = load_expert(path)
    return dict(model.state_dict())


_DEFAULT_OPTIM = OptimConfig()
_DEFAULT_SCHEDULE = ScheduleConfig()


class ExpertModule(ClassifierModule):
    """Fine-tune a foundation's body with a new ``net.num_classes``-way head on one task (LP-FT).

    Args:
        net: the architecture (as the foundation's, with ``num_classes`` = the task's classes).
        foundation: checkpoint of the foundation (vf model checkpoint or ClassifierModule ``.ckpt``).
        foundation_name: label stored with the expert (experts of one foundation share it, e.g. ``a``).
        task: task name; classes: the original labels of the task (stored for the merge command).
        probe_epochs: epochs that train only the head before full fine-tuning.
        export_path: where the standalone expert checkpoint is written at the end of fit.
    """

    def __init__(
        self,
        net: ModelConfig,
        foundation: str,
        foundation_name: str = "a",
        task: str = "task",
        classes: list[int] | None = None,
        probe_epochs: int = 0,
        export_path: str | None = None,
        optim: OptimConfig = _DEFAULT_OPTIM,
        schedule: ScheduleConfig = _DEFAULT_SCHEDULE,
        seed: int | None = None,
        compile: bool = False,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__(net, optim, schedule, seed, compile, channels_last)
        extra = {"foundation": foundation, "foundation_name": foundation_name, "task": task}
        self.save_hyperparameters(
            {
                **dict(self.hparams),
                **extra,
                "classes": classes,
                "probe_epochs": probe_epochs,
                "export_path": export_path,
            }
        )
        self.head = head_name(self.net)
        state = foundation_state(foundation)
        body = {k: v for k, v in state.items() if not k.startswith(self.head + ".")}
        result = self.net.load_state_dict(body, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(self.head + ".")]
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"foundation {foundation!r} does not fit architecture {self.net_config.arch!r} "
                f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
            )
        self.probe_epochs = probe_epochs
        self.export_path = export_path
        self.task = task
        self.classes = classes
        self.foundation_name = foundation_name
        self.probe_head: dict[str, torch.Tensor] = self._head_state()  # replaced when probing ends
        self.locality_result: dict[str, Any] = {}

    def _head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.net.state_dict().items() if k.startswith(self.head + ".")}

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == self.probe_epochs:  # probing is over: keep the probed head for the barrier
            self.probe_head = self._head_state()

    def _probing(self) -> bool:
        return self._trainer is not None and self.training and self.current_epoch < self.probe_epochs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._probing():
            return super().forward(x)
        head = dict(self.net.named_modules())[self.head]
        feats: dict[str, torch.Tensor] = {}
        handle = head.register_forward_pre_hook(lambda _m, inp: feats.__setitem__("z", inp[0]))
        try:
            with torch.no_grad():
                self.net(x)
        finally:
            handle.remove()
        return head(feats["z"].detach())

    def locality(self, data: list[tuple[torch.Tensor, torch.Tensor]], points: int = 5) -> dict[str, Any]:
        """How far the expert moved: ``distance`` = ‖θ_t − θ_0‖ / ‖θ_0‖ over the body, and ``barrier`` = the
        largest excess loss on ``data`` along the straight path from the linear-probe model (foundation body +
        probed head; the fresh head when ``probe_epochs`` is 0) to the expert, over the line between the two
        end losses; ``path_loss`` lists the losses at ``points`` evenly spaced α."""
        state = {k: v.detach() for k, v in self.net.state_dict().items()}
        found = {k: v.to(state[k]) for k, v in foundation_state(self.hparams["foundation"]).items()
                 if not k.startswith(self.head + ".")}  # fmt: skip
        start = {**state, **found, **{k: v.to(state[k]) for k, v in self.probe_head.items()}}
        alphas = [i / (points - 1) for i in range(points)]
        losses = path_losses(self.net_config, start, state, data, alphas)
        return {"distance": relative_distance(found, state), "barrier": loss_barrier(losses, alphas),
                "path_loss": losses}  # fmt: skip

    def export_expert(self, path: str | Path) -> Path:
        """Write the expert as a standalone model checkpoint with its task metadata (and locality, if measured)."""
        meta: dict[str, Any] = {
            "source": "ExpertModule",
            "task": self.task,
            "classes": self.classes,
            "foundation": self.foundation_name,
            "foundation_path": self.hparams["foundation"],
            **self.locality_result,
        }
        return save_model_checkpoint(self.net, self.net_config, path, meta=meta)

    def on_fit_end(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "calibration_dataloader"):
            loader = dm.calibration_dataloader(1000, shard=False)
            data = [(x.to(self.device), y.to(self.device)) for x, y in loader]
            self.locality_result = self.locality(data)
            for lg in self.trainer.loggers:
                lg.log_metrics({f"expert/{k}": v for k, v in self.locality_result.items() if k != "path_loss"},
                               step=self.trainer.global_step)  # fmt: skip
        if self.export_path and self.trainer.is_global_zero:
            self.export_expert(self.export_path)
