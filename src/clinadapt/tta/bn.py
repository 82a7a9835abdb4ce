"""Test-time batch normalisation: each test batch is normalised with its own statistics.

Nado et al. 2020, "Evaluating Prediction-Time Batch Normalization for Robustness under Covariate
Shift" (prediction-time BN), and Schneider et al. 2020, "Improving robustness against common
corruptions by covariate shift adaptation" (NeurIPS). Every batch-norm layer normalises with

    mu = N/(N+n) mu_s + n/(N+n) mu_t,    sigma^2 = N/(N+n) sigma_s^2 + n/(N+n) sigma_t^2,

where mu_s, sigma_s^2 are the source running statistics, mu_t, sigma_t^2 the mean and (biased)
variance of the layer's input over the n images of the test batch (and its spatial positions),
and N = ``prior`` is the source's weight in images (Schneider et al.). ``prior`` = 0 (the
default) is prediction-time BN; ``prior`` > 0 also works with a batch of one image, for which
the pure batch statistics would be those of that image alone. Nothing is learnt and nothing
carries over between batches, so episodic and continual runs agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from clinadapt.errors import ClinadaptError, ConfigError
from clinadapt.tta.base import TTA_METHODS, Session, TTAMethod, TTAResult
from clinadapt.tta.model import TTAModel, batch_norms


@dataclass
class BNConfig:
    prior: float = field(
        default=0.0,
        metadata={
            "help": "weight N of the source statistics, in images (Schneider et al. 2020); "
            "0 uses the test batch's statistics alone"
        },
    )

    def __post_init__(self) -> None:
        if not self.prior >= 0:
            raise ConfigError(f"tta 'bn': prior must be 0 or more, got {self.prior}")


class BatchStatsSession(Session):
    """Eval mode, with a hook that sets every batch norm's running statistics from the batch."""

    def __init__(self, model: TTAModel, result: TTAResult, prior: float) -> None:
        super().__init__(model.eval(), result)
        self.prior = prior
        self.source: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in batch_norms(model):
            if module.running_mean is not None and module.running_var is not None:
                self.source[module] = (module.running_mean.clone(), module.running_var.clone())
                module.register_forward_pre_hook(self._mix)
            # a batch norm without running statistics already normalises with the batch's

    def _mix(self, module: nn.modules.batchnorm._BatchNorm, args: tuple) -> None:
        x = args[0].detach()
        dims = [0, *range(2, x.ndim)]
        n = x.shape[0]
        source = self.prior / (self.prior + n)
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        mu_s, var_s = self.source[module]
        module.running_mean.copy_(source * mu_s + (1 - source) * mean)
        module.running_var.copy_(source * var_s + (1 - source) * var)

    def step(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            probs = self.model(images).softmax(1)
        self.result.adapted += len(images)
        return probs


class BatchNormAdapt(TTAMethod):
    name = "bn"
    config_cls = BNConfig
    description = "test-time batch norm (Nado et al. / Schneider et al. 2020): batch statistics"
    config: BNConfig

    def check(self, model: TTAModel) -> None:
        super().check(model)
        if not batch_norms(model):
            raise ClinadaptError(
                f"bn re-estimates the statistics of batch-norm layers from each test batch; "
                f"{model.name} has none (layer and group norms already normalise each image by "
                "itself): use tta 'tent' or 'sar', which adapt their affine parameters"
            )

    def min_batch(self, model: TTAModel) -> int:
        return 1 if self.config.prior > 0 else 2

    def uses_batch_statistics(self, model: TTAModel) -> bool:
        return True

    def start(
        self,
        model: TTAModel,
        batch_size: int,
        result: TTAResult,
        source: Iterable[torch.Tensor] | None,
    ) -> Session:
        result.details["prior"] = self.config.prior
        return BatchStatsSession(model, result, self.config.prior)


TTA_METHODS.register("bn", BatchNormAdapt)
