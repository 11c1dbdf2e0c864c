"""Client for the NSML runner's Unix socket (``NSML_SOCKET``).

Protocol: newline-delimited JSON over one long-lived connection. Each request is a single JSON
object on one line; the runner answers each with exactly one JSON object on one line, in order.

Requests::

    {"op": "report", "summary": bool, "scope": str|null, "step": int|null, "metrics": {...}}
    {"op": "save", "checkpoint": "NAME", "path": "/abs/dir"}
    {"op": "load", "checkpoint": "NAME", "session": "TEAM/DATASET/N"|null}   -> {"ok": true, "path": "/abs/dir"}
    {"op": "predictions", "predictions": <json>}

Responses are ``{"ok": true, ...}`` or ``{"ok": false, "error": "message"}``; the latter raises
``RuntimeError(message)`` in the caller. The connection is shared by all threads (a lock keeps
request and response paired) and is re-opened after a fork or a broken connection.

A request waits for its answer however long it takes: while a platform service restarts, the runner
retries for up to a minute before it answers, and the SDK raises only on the runner's final answer.
"""

import json
import os
import socket
import threading

__all__ = ["RunnerClient", "encode"]


def encode(payload):
    """Encode one request as a JSON line (UTF-8, no NaN/Infinity literals)."""
    text = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (text + "\n").encode("utf-8")


class RunnerClient:
    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._sock = None
        self._rfile = None
        self._pid = None
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self):
        # The parent may have held the lock while forking; the child starts afresh.
        self._lock = threading.Lock()

    def _connect(self):
        self._close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Block for as long as the runner takes: it answers only once the platform has, retrying through a
        # restart of a service for up to a minute, and a timeout here (such as one the training code set with
        # socket.setdefaulttimeout) would turn that wait into an error.
        sock.settimeout(None)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise RuntimeError("nsml: cannot reach the NSML runner at %s: %s" % (self.path, exc)) from None
        self._sock = sock
        self._rfile = sock.makefile("rb")
        self._pid = os.getpid()

    def _close(self):
        if self._rfile is not None:
            try:
                self._rfile.close()
            except OSError:
                pass
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self._rfile = None
        self._pid = None

    def close(self):
        with self._lock:
            self._close()

    def request(self, payload):
        """Send one request and return the runner's response (a dict with ``"ok": true``)."""
        line = encode(payload)
        with self._lock:
            if self._sock is None or self._pid != os.getpid():
                # A forked child must not share its parent's connection.
                self._connect()
            try:
                self._sock.sendall(line)
                raw = self._rfile.readline()
            except OSError as exc:
                self._close()
                raise RuntimeError("nsml: lost the connection to the NSML runner: %s" % exc) from None
            if not raw:
                self._close()
                raise RuntimeError("nsml: the NSML runner closed the connection")
        try:
            response = json.loads(raw.decode("utf-8"))
        except ValueError:
            raise RuntimeError("nsml: malformed response from the NSML runner: %r" % raw[:200]) from None
        if not isinstance(response, dict):
            raise RuntimeError("nsml: malformed response from the NSML runner: %r" % raw[:200])
        if response.get("ok") is not True:
            message = response.get("error")
            if not isinstance(message, str) or not message:
                message = "the NSML runner refused the %r request" % payload.get("op")
            raise RuntimeError(message)
        return response
