"""VTAB-1k data: task registry, folder-format loader with a decode-once cache, batching,
normalization, and the bundled offline demo task."""
from data.digits import ensure_digits
from data.folder import SplitData, load_split
from data.loader import Batches, batches
from data.normalize import normalize
from data.registry import SPLITS, TASKS, VTAB_TASKS, Task, get_task

__all__ = ["SPLITS", "TASKS", "VTAB_TASKS", "Task", "get_task", "SplitData", "load_split",
           "Batches", "batches", "normalize", "ensure_digits"]
