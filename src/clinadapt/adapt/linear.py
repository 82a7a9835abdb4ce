"""Logistic-regression linear probe on standardised frozen features.

The standard protocol for frozen representations (Radford et al. 2021, CLIP; Oquab et al. 2023,
DINOv2): L-BFGS logistic regression whose L2 strength is chosen on the validation split, never on
test. Multi-label tasks fit one binary probe per label (one-vs-rest) with a shared C.

Every C is fitted from zero, not warm-started from its neighbour: L-BFGS stops at its tolerance,
and at large C (weak regularisation, nearly separable few-shot supports) that stopping point
depends on where it started, so a warm-started path selects other probes. The fits run with one
BLAS thread: a support set is small (N x D about 500 x 1280), multithreaded matrix-vector
products on it cost more in hand-offs than they save (25x slower on a busy two-core machine),
and a single thread gives the same probe whatever the machine's thread settings.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from clinadapt.adapt._checks import check_fit_inputs, check_query, row_slices
from clinadapt.adapt.base import METHODS, FrozenFeatureMethod
from clinadapt.data.info import TaskType
from clinadapt.errors import ClinadaptError, ConfigError
from clinadapt.eval.metrics import auc


@dataclass
class LinearConfig:
    c_grid: tuple[float, ...] = field(
        default=tuple(float(c) for c in np.logspace(-4, 4, 9)),
        metadata={"help": "inverse L2 strengths C tried; the best by validation AUC is kept"},
    )
    class_weight: str | None = field(
        default=None, metadata={"help": "'balanced' reweights classes by inverse frequency"}
    )
    max_iter: int = field(default=1000, metadata={"help": "L-BFGS iteration limit per fit"})

    def __post_init__(self) -> None:
        if not self.c_grid or any(not c > 0 for c in self.c_grid):
            raise ConfigError(f"linear: c_grid must be positive numbers, got {self.c_grid}")
        if self.class_weight not in (None, "balanced"):
            raise ConfigError(
                f"linear: class_weight must be 'balanced' or null, got {self.class_weight!r}"
            )
        if self.max_iter < 1:
            raise ConfigError(f"linear: max_iter must be at least 1, got {self.max_iter}")


@dataclass(frozen=True)
class LinearHead:
    """A fitted single-label probe as a linear map: logits = ``coef`` @ ((x - ``mean``) /
    ``scale``) + ``intercept``, with scikit-learn's shapes: ``coef`` (C, D) for C >= 3 classes,
    (1, D) for a binary probe (the logit of class 1)."""

    coef: np.ndarray
    intercept: np.ndarray
    mean: np.ndarray
    scale: np.ndarray


@dataclass
class _Probe:
    """One fitted softmax/binary probe, or a constant when the support holds a single class."""

    num_classes: int
    model: LogisticRegression | None
    constant: int = 0

    def proba(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), self.num_classes))
        if self.model is None:
            out[:, self.constant] = 1.0
        else:
            out[:, self.model.classes_] = self.model.predict_proba(x)
        return out

    @property
    def converged(self) -> bool:
        return self.model is None or bool((self.model.n_iter_ < self.model.max_iter).all())


def _val_auc(y: np.ndarray, p: np.ndarray, task: TaskType) -> float:
    """MedMNIST's AUC (macro one-vs-rest, per-label mean); NaN if a class has one value in val."""
    return auc(y, p, task)


def _val_log_loss(y: np.ndarray, p: np.ndarray, task: TaskType) -> float:
    if task.single_label:
        return float(log_loss(y, p, labels=range(p.shape[1])))
    pairs = [np.stack([1 - p[:, c], p[:, c]], axis=1) for c in range(p.shape[1])]
    return float(np.mean([log_loss(y[:, c], q, labels=[0, 1]) for c, q in enumerate(pairs)]))


class LinearProbe(FrozenFeatureMethod):
    """``selected()`` reports the chosen C, how it was chosen, and the validation scores."""

    config_cls = LinearConfig
    description = "logistic-regression probe on standardised features, C chosen on validation"
    uses_validation = True
    config: LinearConfig

    def __init__(self, config: LinearConfig | None = None) -> None:
        super().__init__(config)
        self._scaler: StandardScaler | None = None
        self._probes: list[_Probe] = []
        self._task: TaskType | None = None
        self._num_classes = 0
        self._selected: dict[str, Any] = {}

    def fitted_parameters(self) -> int:
        return sum(
            p.model.coef_.size + p.model.intercept_.size
            for p in self._probes
            if p.model is not None
        )

    def _fit_probes(self, x: np.ndarray, y: np.ndarray, c: float, seed: int) -> list[_Probe]:
        columns = [y] if self._task.single_label else list(y.T)
        n_out = self._num_classes if self._task.single_label else 2
        probes = []
        for col in columns:
            classes = np.unique(col)
            if len(classes) == 1:
                probes.append(_Probe(n_out, None, int(classes[0])))
                continue
            model = LogisticRegression(
                C=c,
                solver="lbfgs",
                max_iter=self.config.max_iter,
                class_weight=self.config.class_weight,
                random_state=seed,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # reported in selected()
                probes.append(_Probe(n_out, model.fit(x, col)))
        return probes

    def _proba(self, probes: list[_Probe], x: np.ndarray) -> np.ndarray:
        if self._task.single_label:
            return probes[0].proba(x)
        return np.stack([probe.proba(x)[:, 1] for probe in probes], axis=1)

    def fit(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        task: TaskType,
        num_classes: int,
        val: tuple[np.ndarray, np.ndarray] | None = None,
        seed: int = 0,
    ) -> LinearProbe:
        x, y, self._task, val = check_fit_inputs(features, labels, task, num_classes, val)
        self._num_classes = num_classes
        self._scaler = _standard_scaler(x)
        x = self._scaler.transform(x, copy=False)  # x and val are check_features' copies
        with threadpool_limits(limits=1, user_api="blas"):
            if val is None:
                self._probes = self._fit_probes(x, y, 1.0, seed)
                self._selected = {"C": 1.0, "selection": "default C=1 (no validation split given)"}
            else:
                self._select(x, y, (self._scaler.transform(val[0], copy=False), val[1]), seed)
        self._selected["converged"] = all(p.converged for p in self._probes)
        return self

    def _select(
        self, x: np.ndarray, y: np.ndarray, val: tuple[np.ndarray, np.ndarray], seed: int
    ) -> None:
        """Fit one probe set per C on the support; keep the best on validation (ties: smaller C,
        i.e. the stronger regularisation). Uses AUC, or log-loss where val AUC is undefined."""
        fits = [self._fit_probes(x, y, c, seed) for c in self.config.c_grid]
        probas = [self._proba(probes, val[0]) for probes in fits]
        scores = [_val_auc(val[1], p, self._task) for p in probas]
        metric = "auc"
        if np.isnan(scores).any():
            metric = "log_loss"
            scores = [-_val_log_loss(val[1], p, self._task) for p in probas]
        best = int(np.argmax(scores))
        sign = 1.0 if metric == "auc" else -1.0
        self._probes = fits[best]
        self._selected = {
            "C": float(self.config.c_grid[best]),
            "selection": f"validation {metric}",
            "val_score": sign * scores[best],
            "val_scores": [sign * s for s in scores],
        }

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        q = check_query(features, None if self._scaler is None else self._scaler.n_features_in_)
        return self._proba(self._probes, self._scaler.transform(q, copy=False))

    def selected(self) -> dict[str, Any]:
        return dict(self._selected)

    def linear_head(self) -> LinearHead:
        """The fitted probe as a ``LinearHead`` (copies), for code that runs it as a network
        layer (test-time adaptation). Only single-label probes that saw every class have one."""
        if self._scaler is None:
            raise ClinadaptError("the linear probe is not fitted yet; call fit first")
        if not self._task.single_label:
            raise ClinadaptError(
                "a multi-label probe is one binary probe per label (sigmoids), not one linear "
                "softmax head"
            )
        model = self._probes[0].model
        if model is None or len(model.classes_) != self._num_classes:
            seen = [self._probes[0].constant] if model is None else model.classes_.tolist()
            raise ClinadaptError(
                f"the linear probe saw only classes {seen} of {self._num_classes} in its "
                "support set, so it has no logit for the others; use more shots"
            )
        scaler = self._scaler
        scale = scaler.scale_ if scaler.scale_ is not None else np.ones(scaler.n_features_in_)
        return LinearHead(
            model.coef_.copy(), model.intercept_.copy(), scaler.mean_.copy(), scale.copy()
        )


def _standard_scaler(x: np.ndarray) -> StandardScaler:
    """``StandardScaler().fit(x)`` a block of rows at a time: fitting at once makes temporaries
    of twice the size of ``x``. One block (up to a million values) is the plain fit."""
    scaler = StandardScaler()
    for rows in row_slices(x):
        scaler.partial_fit(x[rows])
    return scaler


METHODS.register("linear", LinearProbe)
