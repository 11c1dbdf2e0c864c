"""Conversion of user values (metrics, predictions) into plain JSON values.

Only the standard library is required. numpy, pandas and torch values are converted when those
modules are already imported by the user's code (they are looked up in ``sys.modules`` and never
imported here):

* numpy scalars -> ``.item()``; numpy arrays -> ``.tolist()``
* pandas ``DataFrame`` -> list of record dicts (``to_dict(orient="records")``); ``Series`` -> list
* torch tensors -> ``.tolist()``

Tuples become lists. Floats that JSON cannot carry (NaN, +/-inf) become the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` so that a diverging loss does not stop training.
Anything else raises :class:`NotJsonable`, which carries the path of the offending value.
"""

import math
import sys
from collections.abc import Mapping

__all__ = ["NotJsonable", "to_json", "describe_type"]


class NotJsonable(TypeError):
    """Raised for a value that has no JSON form. ``path`` locates it, e.g. ``['a'][3]``."""

    def __init__(self, path, value):
        self.path = path
        self.value_type = describe_type(value)
        super().__init__("value at %s of type %s is not JSON-serialisable" % (path or "<root>", self.value_type))


def describe_type(value):
    cls = type(value)
    module = getattr(cls, "__module__", "")
    name = getattr(cls, "__qualname__", cls.__name__)
    if module in ("builtins", "", None):
        return name
    return "%s.%s" % (module, name)


def _float(value):
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _key(key, path):
    if isinstance(key, str):
        return str(key)
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        return str(int(key))
    if isinstance(key, float):
        return repr(float(key))
    np = sys.modules.get("numpy")
    if np is not None and isinstance(key, np.generic):
        return _key(key.item(), path)
    raise NotJsonable("%s (dict key %r)" % (path or "<root>", key), key)


def to_json(value, path=""):
    """Return ``value`` as nested dicts/lists/str/int/float/bool/None, or raise NotJsonable."""
    if value is None or value is True or value is False:
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bool):  # bool subclasses (e.g. from C extensions)
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, Mapping):
        return {_key(k, path): to_json(v, "%s[%r]" % (path, k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v, "%s[%d]" % (path, i)) for i, v in enumerate(value)]

    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(value, np.ndarray):
            return to_json(value.tolist(), path)
        if isinstance(value, np.generic):
            return to_json(value.item(), path)

    pd = sys.modules.get("pandas")
    if pd is not None:
        if isinstance(value, pd.DataFrame):
            return to_json(value.to_dict(orient="records"), path)
        if isinstance(value, pd.Series):
            return to_json(value.tolist(), path)

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return to_json(value.detach().cpu().tolist(), path)

    raise NotJsonable(path, value)
