"""Datasets for clinadapt: records, readers, transforms, few-shot sampling, synthetic data."""

from clinadapt.data.dataset import Dataset, Split
from clinadapt.data.info import DatasetInfo, TaskType
from clinadapt.data.registry import DATASETS, load_dataset, resolve_root
from clinadapt.data.sampler import few_shot_cases, few_shot_indices
from clinadapt.data.synthetic import make_synthetic
from clinadapt.data.transforms import Preprocess

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetInfo",
    "Preprocess",
    "Split",
    "TaskType",
    "few_shot_cases",
    "few_shot_indices",
    "load_dataset",
    "make_synthetic",
    "resolve_root",
]
