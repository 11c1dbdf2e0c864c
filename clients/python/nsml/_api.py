"""bind / save / load / report / paused.

On NSML (``NSML_SOCKET`` set by the runner) these talk to the runner over its Unix socket.
Off NSML they degrade gracefully: checkpoints go to ``./nsml_checkpoints/<checkpoint>/``,
metrics are printed, and ``paused()`` returns without doing anything.
"""

import json
import os
import shutil
import sys
import tempfile
import threading
import time

from . import _jsonify
from ._runner import RunnerClient

__all__ = ["bind", "save", "load", "report", "paused"]

LOCAL_CHECKPOINT_DIR = "nsml_checkpoints"
LOCAL_PREDICTIONS_FILE = "nsml_predictions.json"

# Exit status of a submit session that cannot run inference because of how the code uses nsml.
EXIT_USAGE = 2

_bound = {"save": None, "load": None, "infer": None, "kwargs": {}}
_bound_lock = threading.Lock()

_client = None
_client_lock = threading.Lock()


# --------------------------------------------------------------------------- helpers

def _socket_path():
    return os.environ.get("NSML_SOCKET") or None


def _on_nsml():
    return bool(_socket_path() or os.environ.get("NSML_SESSION"))


def _runner():
    """The shared runner connection; raises when the runner's socket is unknown."""
    global _client
    path = _socket_path()
    if not path:
        raise RuntimeError("nsml: NSML_SOCKET is not set, so the NSML runner cannot be reached")
    with _client_lock:
        if _client is None or _client.path != path:
            if _client is not None:
                _client.close()
            _client = RunnerClient(path)
        return _client


def _reset_runner():
    """Drop the shared connection (the next request reconnects)."""
    global _client
    with _client_lock:
        if _client is not None:
            _client.close()
        _client = None


def _checkpoint_name(checkpoint):
    if checkpoint is None:
        return time.strftime("%Y%m%d%H%M%S")
    name = str(checkpoint)
    if not name:
        raise ValueError("nsml: checkpoint name must not be empty")
    if name == "." or "/" in name or "\0" in name or ".." in name:
        raise ValueError("nsml: invalid checkpoint name %r (it may not be '.', or contain '/', NUL or '..')" % name)
    return name


def _bindings():
    with _bound_lock:
        return dict(_bound, kwargs=dict(_bound["kwargs"]))


def _need(kind):
    fn = _bindings()[kind]
    if fn is None:
        raise RuntimeError("nsml.%s: no %s function is bound; call nsml.bind(%s=...) first" % (kind, kind, kind))
    return fn


def _call_kwargs(kw):
    merged = _bindings()["kwargs"]
    merged.update(kw)
    return merged


def _dataset_path():
    return os.environ.get("NSML_DATASET_PATH") or None


# --------------------------------------------------------------------------- bind

def bind(save=None, load=None, infer=None, **kwargs):
    """Register the functions NSML calls.

    ``save(dir_path, **kwargs)`` writes the model's files into ``dir_path``;
    ``load(dir_path, **kwargs)`` reads them back; ``infer(test_data_path)`` returns predictions.
    Extra keyword arguments are passed on to ``save`` and ``load``. Binding again replaces
    all three functions.
    """
    for name, fn in (("save", save), ("load", load), ("infer", infer)):
        if fn is not None and not callable(fn):
            raise TypeError("nsml.bind: %s must be callable, got %s" % (name, _jsonify.describe_type(fn)))
    with _bound_lock:
        _bound["save"] = save
        _bound["load"] = load
        _bound["infer"] = infer
        _bound["kwargs"] = dict(kwargs)


# --------------------------------------------------------------------------- save / load

def save(checkpoint=None, **kwargs):
    """Save a checkpoint named ``str(checkpoint)`` (``None``: the current time, e.g. ``20240101120000``).

    The bound ``save`` is called with a fresh, empty directory; whatever it writes there becomes
    the checkpoint. Saving under an existing name replaces that checkpoint. On NSML the runner
    stores the directory (and may refuse it, e.g. when the team's storage quota is used up:
    that raises ``RuntimeError`` with the runner's message). Returns the checkpoint name.
    """
    name = _checkpoint_name(checkpoint)
    fn = _need("save")
    kw = _call_kwargs(kwargs)
    if not _on_nsml():
        return _save_local(name, fn, kw)

    client = _runner()
    base = os.path.join(os.environ.get("NSML_SESSION_DIR") or tempfile.gettempdir(), "ckpt-tmp")
    os.makedirs(base, exist_ok=True)
    path = os.path.abspath(tempfile.mkdtemp(prefix="", dir=base))
    try:
        fn(path, **kw)
        client.request({"op": "save", "checkpoint": name, "path": path})
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    # Once the runner has answered, the directory is the runner's (it moves or copies it).
    return name


def _save_local(name, fn, kw):
    root = os.path.abspath(LOCAL_CHECKPOINT_DIR)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        fn(tmp, **kw)
        target = os.path.join(root, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        elif os.path.lexists(target):
            os.remove(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print("nsml.save: not on NSML, checkpoint %r saved to %s" % (name, target), flush=True)
    return name


def load(checkpoint, session=None, **kwargs):
    """Load checkpoint ``str(checkpoint)`` through the bound ``load`` and return what it returns.

    ``session`` (``TEAM/DATASET/N``) loads from another session of the same team; ``None`` means
    this session. Off NSML the checkpoint is read from ``./nsml_checkpoints/<checkpoint>/``.
    """
    if checkpoint is None:
        raise ValueError("nsml.load: a checkpoint name is required")
    name = _checkpoint_name(checkpoint)
    if session is not None:
        session = str(session)
    fn = _need("load")
    kw = _call_kwargs(kwargs)
    if not _on_nsml():
        path = os.path.join(os.path.abspath(LOCAL_CHECKPOINT_DIR), name)
        if session is not None:
            print("nsml.load: not on NSML, sessions are not available; reading %s" % path, flush=True)
        if not os.path.isdir(path):
            raise FileNotFoundError("nsml.load: no local checkpoint %r (looked in %s)" % (name, path))
        return fn(path, **kw)

    response = _runner().request({"op": "load", "checkpoint": name, "session": session})
    path = response.get("path")
    if not isinstance(path, str) or not path:
        raise RuntimeError("nsml.load: the NSML runner gave no path for checkpoint %r" % name)
    return fn(path, **kw)


# --------------------------------------------------------------------------- report

def _step(step):
    if step is None:
        return None
    try:
        value = _jsonify.to_json(step)
    except TypeError:
        value = step
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("nsml.report: step must be an integer, got %s" % _jsonify.describe_type(step))
    return value


def report(summary=False, scope=None, step=None, **metrics):
    """Record metrics, e.g. ``nsml.report(summary=True, step=epoch, train__loss=0.3, val__acc=0.9)``.

    Values must be JSON-serialisable (numbers, strings, bools, None, lists, dicts; numpy scalars
    and arrays are converted); otherwise ``TypeError`` names the offending metric.
    ``summary=True`` makes them the summary shown by ``nsml ps`` and ``nsml model ls``.
    A ``train__loss`` metric is plotted as ``train/loss``. ``scope`` (usually ``locals()``) is
    accepted for compatibility; only a string scope is sent to the runner.
    """
    clean = {}
    for key, value in metrics.items():
        try:
            clean[key] = _jsonify.to_json(value)
        except _jsonify.NotJsonable as exc:
            where = "" if not exc.path else " (at %s%s)" % (key, exc.path)
            raise TypeError(
                "nsml.report: metric %r is not JSON-serialisable: got %s%s" % (key, exc.value_type, where)
            ) from None
    step = _step(step)
    if not _on_nsml():
        shown = ", ".join("%s=%s" % (k, _show(v)) for k, v in clean.items())
        prefix = "nsml.report"
        if step is not None:
            prefix += " step=%d" % step
        if summary:
            prefix += " (summary)"
        print("%s: %s" % (prefix, shown), flush=True)
        return
    _runner().request({
        "op": "report",
        "summary": bool(summary),
        "scope": scope if isinstance(scope, str) else None,
        "step": step,
        "metrics": clean,
    })


def _show(value):
    if isinstance(value, float):
        return "%.6g" % value
    return json.dumps(value, ensure_ascii=False)


# --------------------------------------------------------------------------- paused

def _fail(message):
    print("nsml.paused: %s" % message, file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def paused(scope=None):
    """Hand control to NSML.

    In a submit session (``NSML_MODE=test``, started as ``main.py --mode test --pause 1``) this
    loads the submitted checkpoint with the bound ``load``, runs the bound ``infer`` on
    ``DATASET_PATH/test/test_data``, sends the predictions to NSML, prints ``Infer done`` and
    ends the process with status 0. It never returns there.

    Anywhere else it prints a note and returns.
    """
    if os.environ.get("NSML_MODE") != "test":
        if _on_nsml():
            print("nsml.paused: this is a training session, nothing to do", flush=True)
        else:
            print("nsml.paused: does nothing outside NSML", flush=True)
        return

    bound = _bindings()
    missing = [k for k in ("load", "infer") if bound[k] is None]
    if missing:
        _fail("no %s function is bound; call nsml.bind(save=..., load=..., infer=...) before nsml.paused()"
              % " and no ".join(missing))
    checkpoint_dir = os.environ.get("NSML_CHECKPOINT_DIR")
    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        _fail("NSML_CHECKPOINT_DIR does not name the submitted checkpoint's directory (%r)" % checkpoint_dir)
    dataset = _dataset_path()
    if not dataset:
        _fail("NSML_DATASET_PATH is not set")
    test_data = os.path.join(dataset, "test", "test_data")

    bound["load"](checkpoint_dir, **bound["kwargs"])
    result = bound["infer"](test_data)
    try:
        predictions = _jsonify.to_json(result)
    except _jsonify.NotJsonable as exc:
        _fail("the predictions returned by infer() are not JSON-serialisable: %s" % exc)

    if _on_nsml():
        try:
            _runner().request({"op": "predictions", "predictions": predictions})
        except RuntimeError as exc:
            print("nsml.paused: predictions were not accepted: %s" % exc, file=sys.stderr, flush=True)
            sys.exit(1)
    else:
        # A local dry run of a submit: keep the predictions for inspection.
        out = os.path.abspath(LOCAL_PREDICTIONS_FILE)
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(predictions, fh, ensure_ascii=False, allow_nan=False)
        print("nsml.paused: not on NSML, predictions written to %s" % out, flush=True)
    print("Infer done", flush=True)
    sys.exit(0)
