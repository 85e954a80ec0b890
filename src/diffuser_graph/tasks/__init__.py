"""Tasks: each turns its config into token sequences, labels and splits (:class:`TaskData`).

``TaskConfig`` is the union of every task's config, told apart by ``name``; :func:`load_task`
dispatches to the task's ``load(config, seed)``.
"""

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from . import image, listops, lm, mlm, multihop, pathfinder, retrieval, text
from .base import AnySplit, DataError, MaskedSplit, Split, TaskData, TokenSplit, collate, pad
from .image import ImageTask
from .listops import ListOpsTask
from .lm import LMTask
from .mlm import MLMTask
from .multihop import MultiHopTask
from .pathfinder import PathfinderTask
from .retrieval import RetrievalTask
from .text import TextTask
from .vocab import CLS_ID, IGNORE_INDEX, PAD_ID

TaskConfig = Annotated[ListOpsTask | TextTask | ImageTask | PathfinderTask | RetrievalTask | LMTask
                       | MLMTask | MultiHopTask,
                       Field(discriminator="name")]

_LOADERS: dict[str, Callable[[Any, int], TaskData]] = {
    "listops": listops.load, "text": text.load, "image": image.load,
    "pathfinder": pathfinder.load, "retrieval": retrieval.load, "lm": lm.load, "mlm": mlm.load,
    "multihop": multihop.load}


def load_task(task: TaskConfig, seed: int) -> TaskData:
    """Build the splits of ``task``; generated data is deterministic in ``seed``."""
    return _LOADERS[task.name](task, seed)


__all__ = ["TaskConfig", "ListOpsTask", "TextTask", "ImageTask", "MultiHopTask",
           "PathfinderTask", "RetrievalTask", "LMTask", "MLMTask", "TaskData", "Split",
           "TokenSplit", "MaskedSplit", "AnySplit", "DataError", "collate", "pad", "load_task",
           "PAD_ID", "CLS_ID", "IGNORE_INDEX"]
