"""The SDK against a fake runner: request shapes, responses, errors, one shared connection."""

import json
import os
import shutil
import socket
import tempfile
import threading
import unittest
from unittest import mock

import support  # noqa: F401  (puts the SDK on sys.path)
from support import NSML_VARS, FakeRunner

import nsml
from nsml import _api, _runner


class OnPlatformTest(unittest.TestCase):
    def setUp(self):
        self.runner = FakeRunner(session="demo/t1-cls/3")
        self.session_dir = tempfile.mkdtemp(prefix="nsml-session-")
        env = {k: v for k, v in os.environ.items() if k not in NSML_VARS}
        env.update({
            "NSML_SESSION": "demo/t1-cls/3",
            "NSML_DATASET_NAME": "t1-cls",
            "NSML_SOCKET": self.runner.socket_path,
            "NSML_SESSION_DIR": self.session_dir,
            "NSML_GPU_NUM": "0",
        })
        patcher = mock.patch.dict(os.environ, env, clear=True)
        patcher.start()
        self.addCleanup(patcher.stop)
        _api._reset_runner()
        self.addCleanup(_api._reset_runner)
        self.addCleanup(nsml.bind)
        self.addCleanup(self.runner.close)
        self.addCleanup(shutil.rmtree, self.session_dir, True)
        self.saved = {}
        self.loaded = []

        def save(dir_path, **kwargs):
            self.saved["dir"] = dir_path
            self.saved["kwargs"] = kwargs
            with open(os.path.join(dir_path, "model.json"), "w") as fh:
                json.dump({"w": [1, 2, 3]}, fh)

        def load(dir_path, **kwargs):
            with open(os.path.join(dir_path, "model.json")) as fh:
                self.loaded.append((dir_path, json.load(fh), kwargs))
            return "loaded"

        nsml.bind(save=save, load=load, infer=lambda path: [], flavour="x")

    def test_a_slow_answer_is_waited_for_even_under_a_default_socket_timeout(self):
        # The runner answers late while it retries through a restart of a platform service; training code
        # may have set a global socket timeout far shorter than that.
        self.runner.delay = {"save": 2.0, "report": 2.0}
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(0.2)
        self.addCleanup(socket.setdefaulttimeout, previous)
        self.assertEqual(nsml.save("e1"), "e1")
        nsml.report(step=1, loss=0.5)
        self.assertEqual(len(self.runner.ops("save")), 1)
        self.assertEqual(len(self.runner.ops("report")), 1)

    def test_report_request(self):
        nsml.report(summary=True, scope=locals(), step=3, epoch=3, train__loss=0.25, val__acc=0.9, note="ok")
        nsml.report(step=None, lr=[0.1, 0.01], extra={"a": (1, 2)}, flag=True, nothing=None)
        reports = self.runner.ops("report")
        self.assertEqual(reports[0], {
            "op": "report",
            "summary": True,
            "scope": None,
            "step": 3,
            "metrics": {"epoch": 3, "train__loss": 0.25, "val__acc": 0.9, "note": "ok"},
        })
        self.assertEqual(reports[1], {
            "op": "report",
            "summary": False,
            "scope": None,
            "step": None,
            "metrics": {"lr": [0.1, 0.01], "extra": {"a": [1, 2]}, "flag": True, "nothing": None},
        })
        nsml.report(scope="train", loss=1.0)
        self.assertEqual(self.runner.ops("report")[2]["scope"], "train")

    def test_one_json_object_per_line(self):
        nsml.report(text="line one\nline two", loss=float("nan"), big=float("inf"))
        raw = self.runner.raw_lines[-1]
        self.assertEqual(raw.count("\n"), 1)

        def no_constants(name):
            raise AssertionError("bare %s in the request" % name)

        self.assertEqual(json.loads(raw, parse_constant=no_constants)["metrics"], {"text": "line one\nline two", "loss": "NaN", "big": "Infinity"})

    def test_report_rejects_non_json(self):
        with self.assertRaises(TypeError) as ctx:
            nsml.report(good=1, weird={1, 2})
        self.assertIn("'weird'", str(ctx.exception))
        with self.assertRaises(TypeError) as ctx:
            nsml.report(nested={"ok": [1, object()]})
        self.assertIn("'nested'", str(ctx.exception))
        with self.assertRaises(TypeError):
            nsml.report(step="3", loss=1.0)
        self.assertEqual(self.runner.ops("report"), [], "nothing is sent when validation fails")

    def test_save_sends_a_fresh_directory(self):
        name = nsml.save(4, extra=1)
        self.assertEqual(name, "4")
        (req,) = self.runner.ops("save")
        self.assertEqual(req["checkpoint"], "4")
        self.assertEqual(req["path"], self.saved["dir"])
        self.assertTrue(os.path.isabs(req["path"]))
        self.assertEqual(os.path.dirname(req["path"]), os.path.join(self.session_dir, "ckpt-tmp"))
        self.assertEqual(self.saved["kwargs"], {"flavour": "x", "extra": 1})
        stored = self.runner.checkpoint_dir("4")
        self.assertEqual(os.listdir(stored), ["model.json"])

        nsml.save(4)
        second = self.runner.ops("save")[1]["path"]
        self.assertNotEqual(second, req["path"], "every save gets its own directory")

    def test_save_default_name_is_a_timestamp(self):
        name = nsml.save()
        self.assertTrue(name.isdigit() and len(name) == 14, name)
        self.assertEqual(self.runner.ops("save")[0]["checkpoint"], name)

    def test_save_refused_by_runner(self):
        message = "team demo is over its storage quota (450G); delete checkpoints with `nsml model rm`"
        self.runner.fail["save"] = message
        with self.assertRaises(RuntimeError) as ctx:
            nsml.save("best")
        self.assertEqual(str(ctx.exception), message)
        self.assertEqual(os.listdir(os.path.join(self.session_dir, "ckpt-tmp")), [],
                         "a refused checkpoint's scratch directory is removed")

    def test_checkpoint_names(self):
        for bad in ("", "a/b", "..", "x..y", "nul\0", "."):
            with self.assertRaises(ValueError, msg=repr(bad)):
                nsml.save(bad)
            with self.assertRaises(ValueError, msg=repr(bad)):
                nsml.load(bad)
        self.assertEqual(self.runner.requests, [])
        self.assertEqual(nsml.save("epoch-1.5"), "epoch-1.5")

    def test_load_round_trip(self):
        nsml.save(7)
        self.assertEqual(nsml.load(7), "loaded")
        req = self.runner.ops("load")[0]
        self.assertEqual(req, {"op": "load", "checkpoint": "7", "session": None})
        path, content, kwargs = self.loaded[0]
        self.assertEqual(path, self.runner.checkpoint_dir("7"))
        self.assertEqual(content, {"w": [1, 2, 3]})
        self.assertEqual(kwargs, {"flavour": "x"})

    def test_load_from_another_session(self):
        other = self.runner.checkpoint_dir("2", session="demo/t1-cls/1")
        os.makedirs(other)
        with open(os.path.join(other, "model.json"), "w") as fh:
            json.dump({"w": []}, fh)
        nsml.load("2", session="demo/t1-cls/1")
        self.assertEqual(self.runner.ops("load")[0]["session"], "demo/t1-cls/1")
        self.assertEqual(self.loaded[0][0], other)

    def test_load_error_message(self):
        with self.assertRaises(RuntimeError) as ctx:
            nsml.load("missing")
        self.assertEqual(str(ctx.exception), "checkpoint missing not found")

    def test_one_connection_shared_by_threads(self):
        errors = []

        def work(n):
            try:
                for i in range(20):
                    nsml.report(step=i, thread=n, value=i * n)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(self.runner.ops("report")), 160)
        self.assertEqual(self.runner.connections, 1)

    def test_no_socket_on_platform_is_an_error(self):
        del os.environ["NSML_SOCKET"]
        _api._reset_runner()
        with self.assertRaises(RuntimeError) as ctx:
            nsml.report(loss=1.0)
        self.assertIn("NSML_SOCKET", str(ctx.exception))

    def test_runner_gone(self):
        path = self.runner.socket_path
        self.runner.close()
        with self.assertRaises(RuntimeError) as ctx:
            nsml.report(loss=1.0)
        self.assertIn(path, str(ctx.exception))


class ClientTest(unittest.TestCase):
    def test_malformed_and_refusals(self):
        runner = FakeRunner()
        self.addCleanup(runner.close)
        client = _runner.RunnerClient(runner.socket_path)
        self.addCleanup(client.close)
        self.assertEqual(client.request({"op": "report", "summary": False, "scope": None, "step": None,
                                         "metrics": {}}), {"ok": True})
        with self.assertRaises(RuntimeError) as ctx:
            client.request({"op": "nope"})
        self.assertEqual(str(ctx.exception), "unknown op 'nope'")

    def test_encode(self):
        self.assertEqual(_runner.encode({"op": "report", "metrics": {"a": "é"}}),
                         '{"op":"report","metrics":{"a":"é"}}\n'.encode("utf-8"))
        with self.assertRaises(ValueError):
            _runner.encode({"x": float("nan")})


if __name__ == "__main__":
    unittest.main()
