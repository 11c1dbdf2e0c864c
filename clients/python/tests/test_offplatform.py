"""Behaviour outside NSML: constants, local checkpoints, printed metrics, a no-op paused()."""

import contextlib
import io
import json
import os
import shutil
import tempfile
import unittest
from unittest import mock

import support
from support import NSML_VARS, clean_env, run_python

import nsml
from nsml import _api

CONSTANTS = (
    "import json, nsml, nsml.constants as c; "
    "names = ['DATASET_PATH', 'DATASET_NAME', 'HAS_DATASET', 'IS_ON_NSML', 'GPU_NUM', 'SESSION_NAME']; "
    "assert all(getattr(nsml, n) == getattr(c, n) for n in names); "
    "from nsml.constants import DATASET_PATH; from nsml import GPU_NUM; "
    "print(json.dumps({n: getattr(nsml, n) for n in names}))"
)


class ConstantsTest(unittest.TestCase):
    def constants(self, **env):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        proc = run_python(["-c", CONSTANTS], clean_env(**env), cwd=tmp)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return json.loads(proc.stdout)

    def test_off_platform(self):
        self.assertEqual(self.constants(), {
            "DATASET_PATH": None,
            "DATASET_NAME": None,
            "HAS_DATASET": False,
            "IS_ON_NSML": False,
            "GPU_NUM": 0,
            "SESSION_NAME": None,
        })

    def test_dataset_path_off_platform(self):
        existing = os.path.join(support.EXAMPLES_DIR, "datasets", "t1-cls")
        got = self.constants(NSML_DATASET_PATH=existing)
        self.assertEqual(got["DATASET_PATH"], existing)
        self.assertTrue(got["HAS_DATASET"])
        self.assertFalse(got["IS_ON_NSML"])
        got = self.constants(NSML_DATASET_PATH="/does/not/exist")
        self.assertEqual(got["DATASET_PATH"], "/does/not/exist")
        self.assertFalse(got["HAS_DATASET"])

    def test_on_platform(self):
        existing = os.path.join(support.EXAMPLES_DIR, "datasets", "t2-reg")
        got = self.constants(
            NSML_SESSION="demo/t2-reg/12",
            NSML_DATASET_NAME="t2-reg",
            NSML_DATASET_PATH=existing,
            NSML_GPU_NUM="2",
            NSML_SOCKET="/nonexistent.sock",
        )
        self.assertEqual(got, {
            "DATASET_PATH": existing,
            "DATASET_NAME": "t2-reg",
            "HAS_DATASET": True,
            "IS_ON_NSML": True,
            "GPU_NUM": 2,
            "SESSION_NAME": "demo/t2-reg/12",
        })
        self.assertEqual(self.constants(NSML_GPU_NUM="lots")["GPU_NUM"], 0)


class LocalTest(unittest.TestCase):
    def setUp(self):
        env = {k: v for k, v in os.environ.items() if k not in NSML_VARS}
        patcher = mock.patch.dict(os.environ, env, clear=True)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.tmp = tempfile.mkdtemp(prefix="nsml-local-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        old = os.getcwd()
        os.chdir(self.tmp)
        self.addCleanup(os.chdir, old)
        _api._reset_runner()
        self.addCleanup(nsml.bind)
        self.state = {"value": 1}

        def save(dir_path, **kwargs):
            with open(os.path.join(dir_path, "state.json"), "w") as fh:
                json.dump(dict(self.state, **kwargs), fh)

        def load(dir_path, **kwargs):
            with open(os.path.join(dir_path, "state.json")) as fh:
                self.state = json.load(fh)
            return dir_path

        nsml.bind(save=save, load=load, infer=lambda p: [1])

    def quiet(self, fn, *args, **kwargs):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            result = fn(*args, **kwargs)
        return result, out.getvalue()

    def test_save_and_load_locally(self):
        name, out = self.quiet(nsml.save, 3)
        target = os.path.join(self.tmp, "nsml_checkpoints", "3")
        self.assertEqual(name, "3")
        self.assertIn(target, out)
        self.assertEqual(os.listdir(target), ["state.json"])
        self.state = {"value": 2}
        self.quiet(nsml.save, 3)  # same name replaces
        self.assertEqual(sorted(os.listdir(os.path.join(self.tmp, "nsml_checkpoints"))), ["3"])
        self.state = {}
        path, _ = self.quiet(nsml.load, 3)
        self.assertEqual(path, target)
        self.assertEqual(self.state, {"value": 2})

    def test_load_missing(self):
        with self.assertRaises(FileNotFoundError):
            self.quiet(nsml.load, "nope")
        with self.assertRaises(ValueError):
            nsml.load(None)

    def test_failed_save_leaves_nothing(self):
        def broken(dir_path):
            raise OSError("disk full")

        nsml.bind(save=broken)
        with self.assertRaises(OSError):
            nsml.save("x")
        self.assertEqual(os.listdir(os.path.join(self.tmp, "nsml_checkpoints")), [])

    def test_unbound(self):
        nsml.bind()
        with self.assertRaises(RuntimeError) as ctx:
            nsml.save(1)
        self.assertIn("nsml.bind", str(ctx.exception))
        with self.assertRaises(TypeError):
            nsml.bind(save="not a function")

    def test_bad_names(self):
        for bad in ("", "../x", "a/b", "..", "\0"):
            with self.assertRaises(ValueError):
                nsml.save(bad)

    def test_report_prints(self):
        _, out = self.quiet(nsml.report, summary=True, step=2, epoch=2, train__loss=0.5)
        self.assertIn("epoch=2", out)
        self.assertIn("train__loss=0.5", out)
        self.assertIn("step=2", out)

    def test_report_type_error_names_key(self):
        with self.assertRaises(TypeError) as ctx:
            nsml.report(loss=0.1, model=object())
        self.assertIn("'model'", str(ctx.exception))
        with self.assertRaises(TypeError) as ctx:
            nsml.report(history=[0.1, {"bad": b"bytes"}])
        self.assertIn("'history'", str(ctx.exception))
        self.assertIn("bytes", str(ctx.exception))

    def test_paused_is_a_no_op(self):
        result, out = self.quiet(nsml.paused, scope=locals())
        self.assertIsNone(result)
        self.assertIn("does nothing outside NSML", out)


if __name__ == "__main__":
    unittest.main()
