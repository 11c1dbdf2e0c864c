"""Shared helpers for the SDK tests: paths, a clean environment, and a fake NSML runner."""

import json
import os
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import time

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SDK_DIR = os.path.dirname(TESTS_DIR)
REPO_ROOT = os.path.dirname(os.path.dirname(SDK_DIR))
EXAMPLES_DIR = os.path.join(REPO_ROOT, "examples")

if SDK_DIR not in sys.path:
    sys.path.insert(0, SDK_DIR)

NSML_VARS = (
    "NSML_SESSION",
    "NSML_DATASET_NAME",
    "NSML_DATASET_PATH",
    "NSML_GPU_NUM",
    "NSML_SOCKET",
    "NSML_SESSION_DIR",
    "NSML_MODE",
    "NSML_CHECKPOINT_DIR",
    "NSML_SUBMIT_KIND",
)


def clean_env(**extra):
    """os.environ without any NSML_* variable, with PYTHONPATH pointing at the SDK, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in NSML_VARS}
    env["PYTHONPATH"] = SDK_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_python(args, env, cwd, timeout=60):
    """Run ``python3 -u ARGS...`` the way the runner does; returns CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-u"] + list(args),
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
    )


class FakeRunner:
    """A Unix-socket server that speaks the runner protocol and records every request.

    ``save`` copies the directory into ``store/<session>/<checkpoint>`` (as the real runner
    stores it); ``load`` answers with that directory. ``fail[op] = "message"`` makes an op fail.
    """

    def __init__(self, session="demo/t1-cls/1"):
        self.session = session
        self.tmp = tempfile.mkdtemp(prefix="nsml-fake-runner-")
        self.socket_path = os.path.join(self.tmp, "runner.sock")
        self.store = os.path.join(self.tmp, "store")
        self.requests = []
        self.raw_lines = []
        self.connections = 0
        self.fail = {}
        # ``delay[op] = seconds`` answers that op late, as the runner does while it retries through an outage.
        self.delay = {}
        self.lock = threading.Lock()
        runner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                with runner.lock:
                    runner.connections += 1
                for raw in self.rfile:
                    response = runner.handle_line(raw)
                    self.wfile.write((json.dumps(response) + "\n").encode("utf-8"))
                    self.wfile.flush()

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(self.socket_path, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def checkpoint_dir(self, checkpoint, session=None):
        return os.path.join(self.store, (session or self.session).replace("/", "_"), checkpoint)

    def handle_line(self, raw):
        text = raw.decode("utf-8")
        assert text.endswith("\n"), "a request must end with a newline"
        try:
            request = json.loads(text)
        except ValueError as exc:
            return {"ok": False, "error": "bad request: %s" % exc}
        with self.lock:
            self.raw_lines.append(text)
            self.requests.append(request)
        op = request.get("op")
        if op in self.delay:
            time.sleep(self.delay[op])
        if op in self.fail:
            return {"ok": False, "error": self.fail[op]}
        if op == "report":
            return {"ok": True}
        if op == "save":
            path = request["path"]
            if not os.path.isabs(path) or not os.path.isdir(path):
                return {"ok": False, "error": "save: %r is not a directory" % path}
            target = self.checkpoint_dir(request["checkpoint"])
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(path, target)
            return {"ok": True}
        if op == "load":
            target = self.checkpoint_dir(request["checkpoint"], request.get("session"))
            if not os.path.isdir(target):
                return {"ok": False, "error": "checkpoint %s not found" % request["checkpoint"]}
            return {"ok": True, "path": target}
        if op == "predictions":
            return {"ok": True}
        return {"ok": False, "error": "unknown op %r" % op}

    def ops(self, op):
        with self.lock:
            return [r for r in self.requests if r.get("op") == op]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self.tmp, ignore_errors=True)
