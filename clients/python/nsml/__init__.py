"""NSML SDK for participant code.

Typical use::

    import nsml
    from nsml import DATASET_PATH

    nsml.bind(save=save, load=load, infer=infer)
    if args.pause:
        nsml.paused(scope=locals())
    ...
    nsml.report(summary=True, step=epoch, epoch=epoch, train__loss=loss, val__acc=acc)
    nsml.save(epoch)
"""

from . import constants
from ._api import bind, load, paused, report, save
from .constants import DATASET_NAME, DATASET_PATH, GPU_NUM, HAS_DATASET, IS_ON_NSML, SESSION_NAME

__version__ = "0.1.0"

__all__ = [
    "bind",
    "save",
    "load",
    "report",
    "paused",
    "constants",
    "DATASET_PATH",
    "DATASET_NAME",
    "HAS_DATASET",
    "IS_ON_NSML",
    "GPU_NUM",
    "SESSION_NAME",
]
