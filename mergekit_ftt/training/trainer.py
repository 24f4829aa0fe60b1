"""TRL's ``SFTTrainer`` with Open-Instruct's summed loss (the paper's ``--reduce_loss sum``)."""

from __future__ import annotations

from typing import Any, Literal

from trl import SFTTrainer

LossReduction = Literal["sum", "mean"]


class FttSFTTrainer(SFTTrainer):
    """SFTTrainer with Open-Instruct's summed loss as an option.

    TRL divides the summed token losses by the number of loss tokens in the whole
    optimizer step (over accumulation steps and processes). Open-Instruct's
    ``reduce_loss sum`` divides each rank's summed loss by the accumulation steps
    only, and data parallelism then averages over ranks. Passing that constant as
    ``num_items_in_batch`` gives the same gradient: TRL multiplies by the number of
    processes when ``average_tokens_across_devices`` is on, so the constant includes it.
    """

    def __init__(self, *args: Any, loss_reduction: LossReduction = "mean", **kwargs: Any):
        self.loss_reduction = loss_reduction
        if loss_reduction == "sum":
            self.loss_is_scaled_for_ga = True
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_reduction == "sum" and self.model.training:
            num_items_in_batch = self._sum_reduction_divisor()
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _sum_reduction_divisor(self) -> int:
        divisor = self.current_gradient_accumulation_steps
        if self.args.average_tokens_across_devices:
            divisor *= self.accelerator.num_processes
        return divisor
