"""Values the NSML runner hands to participant code through the environment.

They are read once, when ``nsml`` is first imported:

* ``DATASET_PATH`` -- root of the mounted dataset (``NSML_DATASET_PATH``); ``None`` when unset.
  A training session sees ``DATASET_PATH/train/train_data`` and ``DATASET_PATH/train/train_label``;
  a submit sees ``DATASET_PATH/test/test_data`` only.
* ``DATASET_NAME`` -- the dataset's name (``NSML_DATASET_NAME``); ``None`` when unset.
* ``HAS_DATASET`` -- ``True`` when ``DATASET_PATH`` names an existing directory.
* ``IS_ON_NSML`` -- ``True`` inside a session started by the NSML runner.
* ``GPU_NUM`` -- number of GPUs given to the session (``NSML_GPU_NUM``); ``0`` when unset.
* ``SESSION_NAME`` -- ``TEAM/DATASET/N`` (``NSML_SESSION``); ``None`` when unset.
"""

import os

__all__ = [
    "DATASET_PATH",
    "DATASET_NAME",
    "HAS_DATASET",
    "IS_ON_NSML",
    "GPU_NUM",
    "SESSION_NAME",
]


def _env(name):
    value = os.environ.get(name)
    return value if value else None


def _gpu_num():
    raw = os.environ.get("NSML_GPU_NUM", "").strip()
    try:
        return max(int(raw), 0)
    except ValueError:
        return 0


SESSION_NAME = _env("NSML_SESSION")
DATASET_NAME = _env("NSML_DATASET_NAME")
DATASET_PATH = _env("NSML_DATASET_PATH")
HAS_DATASET = bool(DATASET_PATH) and os.path.isdir(DATASET_PATH)
IS_ON_NSML = bool(SESSION_NAME or _env("NSML_SOCKET"))
GPU_NUM = _gpu_num()
