"""What a prediction task is: its labels' format, its head, loss, scores and metrics.

The engine, the methods and the runner ask the task of a dataset (``task_for(info.task)``)
instead of assuming classification, so a new task (segmentation) is one more registered class.
"""

from clinadapt.tasks.base import TASKS, Task, task_for
from clinadapt.tasks.classification import ClassificationTask
from clinadapt.tasks.segmentation import SegmentationTask

__all__ = ["TASKS", "ClassificationTask", "SegmentationTask", "Task", "task_for"]
