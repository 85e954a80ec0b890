"""Tasks: each turns its config into token sequences, labels and splits (:class:`TaskData`).

``TaskConfig`` is the union of every task's config, told apart by ``name``; :func:`load_task`
dispatches to the task's ``load(config, seed)``.
"""

from typing import Annotated, Union

from pydantic import Field

from . import image, listops, lm, multihop, pathfinder, retrieval, text
from .base import CLS_ID, PAD_ID, DataError, Split, TaskData, collate, pad
from .image import ImageTask
from .listops import ListOpsTask
from .lm import LMTask
from .multihop import MultiHopTask
from .pathfinder import PathfinderTask
from .retrieval import RetrievalTask
from .text import TextTask

TaskConfig = Annotated[Union[ListOpsTask, TextTask, ImageTask, PathfinderTask,
                             RetrievalTask, LMTask, MultiHopTask],
                       Field(discriminator="name")]

_LOADERS = {"listops": listops.load, "text": text.load, "image": image.load,
            "pathfinder": pathfinder.load, "retrieval": retrieval.load,
            "lm": lm.load, "multihop": multihop.load}


def load_task(task: TaskConfig, seed: int) -> TaskData:
    """Build the splits of ``task``; generated data is deterministic in ``seed``."""
    return _LOADERS[task.name](task, seed)


__all__ = ["TaskConfig", "ListOpsTask", "TextTask", "ImageTask", "MultiHopTask",
           "PathfinderTask", "RetrievalTask", "LMTask", "TaskData", "Split", "DataError", "collate",
           "pad", "load_task", "PAD_ID", "CLS_ID"]
