"""The interface of test-time adaptation methods, and the one loop that runs them all.

``TTAMethod.run(model, batches, mode, seed)`` adapts a deep copy of ``model`` (the source model is
never modified) while it predicts the test batches in order, and returns a ``TTAResult``: the
probabilities of every test example plus what happened (examples adapted and filtered, updates,
resets, seconds). ``episodic`` resets the copy to the source state before every batch;
``continual`` keeps adapting across batches. Methods without memory across batches (none, bn,
lame) give the same predictions in both modes.

Safety rules every method shares: a batch whose probabilities come out non-finite is predicted
again after a reset to the source state (a second failure means the source model itself fails on
it: ``ClinadaptError``); parameters or losses that turn non-finite also reset the model; both count
in ``resets``. Methods that estimate batch-norm statistics from each batch refuse a first batch of
one image (batch size 1 makes the statistics those of a single image) and join a later batch of
one image (a test set of 1 + k * batch size images) to the batch before it.
"""

from __future__ import annotations

import copy
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from clinadapt.config import to_dict
from clinadapt.errors import BatchStatisticsWarning, ClinadaptError, ConfigError, DataError
from clinadapt.registry import Registry, did_you_mean
from clinadapt.tta.model import TTAModel, initial_batch_norms

TTA_METHODS: Registry[type[TTAMethod]] = Registry(
    "test-time adaptation method", listing="clinadapt methods"
)
MODES = ("episodic", "continual")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the softmax of each row: H(p) = -sum_c p_c log p_c."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


@dataclass
class TTAResult:
    """Probabilities (N, C) in test order and the run's counts; ``stats()`` is the record part."""

    probabilities: np.ndarray
    method: str
    mode: str
    seed: int
    options: dict[str, Any]
    examples: int = 0
    batches: int = 0
    adapted: int = 0
    """Examples that informed the adaptation (entered a loss, statistics, supports or affinity)."""
    filtered: int = 0
    """Examples a reliability filter left out (SAR, EATA, T3A)."""
    updates: int = 0
    """Optimizer steps taken."""
    resets: int = 0
    """Resets to the source state after non-finite probabilities, losses or parameters."""
    collapses: int = 0
    """Resets by the method's own collapse detector (SAR)."""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    """Values fixed when the run starts: the learning rate scaled to the batch size, margins in
    nats, the batch size that scaling used."""

    def stats(self) -> dict[str, Any]:
        return {
            k: v for k, v in self.__dict__.items() if k != "probabilities" and not k.startswith("_")
        }


class Session(ABC):
    """One run's working state: the model copy being adapted and the method's memory.

    ``save`` (once, after set-up) fixes the source state; ``reset`` returns the model, optimizer
    and memory (``forget``) to it.
    """

    def __init__(self, model: TTAModel, result: TTAResult) -> None:
        self.model = model
        self.result = result
        self.optimizer: torch.optim.Optimizer | None = None
        self._saved: tuple[dict, dict | None] | None = None

    @abstractmethod
    def step(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, C) for one batch, adapting as the method does."""

    def save(self) -> None:
        if self.optimizer is None:
            return  # nothing in the model changes; ``forget`` clears the memory
        self._saved = (
            copy.deepcopy(self.model.state_dict()),
            copy.deepcopy(self.optimizer.state_dict()),
        )

    def reset(self) -> None:
        if self._saved is not None:
            self.model.load_state_dict(self._saved[0])
            self.optimizer.load_state_dict(copy.deepcopy(self._saved[1]))
        self.forget()

    def forget(self) -> None:  # noqa: B027  (a hook: most methods have no memory)
        """Clear the method's memory across batches (moving averages, support sets)."""

    def healthy(self) -> bool:
        """False once the adapted state can no longer be trusted (non-finite values)."""
        return True


class TTAMethod(ABC):
    """Configured by ``config_cls``; ``run`` applies it to a model and a stream of test batches."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    description: ClassVar[str] = ""
    adapts_network: ClassVar[bool] = True
    """False for methods that read only ``model.features`` and the head's outputs (none, t3a,
    lame): they give the same predictions on features extracted beforehand."""

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.config_cls()

    @property
    def uses_source(self) -> bool:
        """Whether ``run`` needs ``source`` images (unlabelled, from the training distribution)."""
        return False

    def check(self, model: TTAModel) -> None:
        """Raise ``ClinadaptError`` naming what the method needs if ``model`` lacks it."""
        if model.head.out_features < 2:
            raise ClinadaptError(
                f"{self.name} adapts a softmax over classes; {model.name}'s head has "
                f"{model.head.out_features} output"
            )

    def min_batch(self, model: TTAModel) -> int:
        """The fewest images a batch must hold (2 where batch-norm statistics come from it)."""
        return 1

    def uses_batch_statistics(self, model: TTAModel) -> bool:
        """Whether ``model``'s batch norms normalise with statistics of the test batches."""
        return False

    @abstractmethod
    def start(
        self,
        model: TTAModel,
        batch_size: int,
        result: TTAResult,
        source: Iterable[torch.Tensor] | None,
    ) -> Session:
        """Configure ``model`` (already a copy) for the method; ``batch_size`` is the first
        batch's, which scales learning rates."""

    def run(
        self,
        model: TTAModel,
        batches: Iterable[torch.Tensor],
        mode: str = "episodic",
        seed: int = 0,
        source: Iterable[torch.Tensor] | None = None,
    ) -> TTAResult:
        """Predict every test batch (preprocessed image tensors, in order) while adapting a copy
        of ``model``; ``source`` is only for methods with ``uses_source``."""
        if mode not in MODES:
            hint = did_you_mean(str(mode), list(MODES))
            raise ConfigError(f"tta mode must be one of {list(MODES)}, got {mode!r}.{hint}")
        if not isinstance(model, TTAModel):
            raise ClinadaptError(
                f"{self.name}: expected a TTAModel, got {type(model).__name__}; wrap the model "
                "with TTAModel.from_adapted or TTAModel.from_linear_probe"
            )
        if source is not None and not self.uses_source:
            raise ConfigError(f"tta {self.name!r} does not use source images with these options")
        if self.uses_source and source is None:
            raise ConfigError(
                f"tta {self.name!r} needs source images (unlabelled, from the training "
                "distribution) with these options; pass source=..."
            )
        self.check(model)
        result = TTAResult(
            probabilities=np.zeros((0, model.head.out_features)),
            method=self.name,
            mode=mode,
            seed=seed,
            options=to_dict(self.config),
        )
        if self.uses_batch_statistics(model) and initial_batch_norms(model):
            result.details["batch_norm_statistics"] = "initial"
            warnings.warn(
                f"tta {self.name!r}: the batch norms of {model.name} hold their initial "
                "statistics (mean 0, variance 1), as when batch norm was folded into the "
                "convolutions on conversion (TFLite weights) or the network was never trained; "
                "test-batch statistics then change features the head was never fitted on (the "
                "MobileNetV2 TFLite probe fell from 0.86 to about 0.5 clean AUC with 'bn'). "
                "For this model use tta 'none' or an output-level method ('t3a', 'lame').",
                BatchStatisticsWarning,
                stacklevel=2,
            )
        param = next(model.parameters())
        devices = [param.device] if param.device.type == "cuda" else []
        started = time.perf_counter()
        outputs: list[np.ndarray] = []
        # inference mode (as evaluation code often runs) would forbid the gradients tent needs
        with torch.inference_mode(False), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            work = copy.deepcopy(model)
            session: Session | None = None
            grouped = _regroup(batches, self.min_batch(work), self.name, model.name)
            for index, raw in enumerate(grouped):
                images = check_batch(raw, f"test batch {index}", param)
                if session is None:
                    session = self.start(work, len(images), result, source)
                    session.save()
                elif mode == "episodic":
                    session.reset()
                outputs.append(self._predict(session, images, index, model.name))
                result.examples += len(images)
                result.batches += 1
        if session is None:
            raise DataError(f"tta {self.name!r}: no test images to adapt on")
        result.probabilities = np.concatenate(outputs)
        result.seconds = time.perf_counter() - started
        return result

    def _predict(self, session: Session, images: torch.Tensor, index: int, name: str) -> np.ndarray:
        result = session.result
        counts = (result.adapted, result.filtered, result.updates, result.collapses)
        probs = session.step(images)
        if not bool(torch.isfinite(probs).all()):
            session.reset()
            result.adapted, result.filtered, result.updates, result.collapses = counts
            result.resets += 1
            probs = session.step(images)
            if not bool(torch.isfinite(probs).all()):
                raise ClinadaptError(
                    f"{name} gives non-finite outputs on test batch {index} even from its source "
                    "state; check the model's weights and the batch's preprocessing"
                )
        if not session.healthy():
            session.reset()
            result.resets += 1
        return probs.detach().double().cpu().numpy()


def check_batch(images: Any, where: str, like: torch.Tensor) -> torch.Tensor:
    """``images`` as a float tensor on ``like``'s device and dtype, or a ``DataError``."""
    if not isinstance(images, torch.Tensor) or images.ndim < 2 or len(images) == 0:
        raise DataError(
            f"{where} must be a non-empty tensor of preprocessed images, got "
            f"{type(images).__name__}"
            + (f" of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else "")
        )
    if not images.is_floating_point() or not bool(torch.isfinite(images).all()):
        raise DataError(
            f"{where} holds non-float or non-finite pixels; preprocess the images "
            "(float, normalised) and remove corrupt ones before test-time adaptation"
        )
    if images.is_inference():  # made under inference mode: autograd cannot record it
        images = images.clone()
    return images.to(device=like.device, dtype=like.dtype)


def _regroup(
    batches: Iterable[torch.Tensor], min_size: int, method: str, model: str
) -> Iterator[torch.Tensor]:
    """Yield the batches, each later batch smaller than ``min_size`` joined to the one before it;
    a first batch that small is an error (the batch size itself is too small)."""
    held = None
    for batch in batches:
        if held is None:
            if _is_batch(batch) and len(batch) < min_size:
                raise ConfigError(
                    f"tta {method!r} estimates batch-norm statistics of {model} from each test "
                    f"batch and needs at least {min_size} images per batch, got {len(batch)}; "
                    "use a larger tta batch size (the papers use 64), or tta 'bn' with prior > 0, "
                    "which mixes the source statistics in (Schneider et al. 2020)"
                )
            held = batch
        elif _is_batch(held) and _is_batch(batch) and 0 < len(batch) < min_size:
            held = torch.cat([held, batch.to(held.device)])
        else:
            yield held
            held = batch
    if held is not None:
        yield held


def _is_batch(batch: Any) -> bool:
    return isinstance(batch, torch.Tensor) and batch.ndim >= 2
