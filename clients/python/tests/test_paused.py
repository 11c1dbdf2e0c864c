"""paused() in a submit session, end to end: a child process started like the runner starts it."""

import json
import os
import shutil
import tempfile
import textwrap
import unittest

from support import FakeRunner, clean_env, run_python

ENTRY = textwrap.dedent('''
    import argparse, json, os, sys
    import nsml
    from nsml import DATASET_PATH

    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="train")
    parser.add_argument("--pause", type=int, default=0)
    parser.add_argument("--iteration", default=None)
    args = parser.parse_args()

    model = {}
    BIND = os.environ.get("TEST_BIND", "all")

    def save(dir_path, **kwargs):
        json.dump(model, open(os.path.join(dir_path, "model.json"), "w"))

    def load(dir_path, **kwargs):
        model.update(json.load(open(os.path.join(dir_path, "model.json"))))
        print("loaded", model["bias"])

    def infer(path, **kwargs):
        ids = sorted(int(line.split(",")[0]) for line in open(os.path.join(path, "data.csv")).read().split()[1:])
        if BIND == "bad-output":
            return {"ids": set(ids)}
        return [{"id": i, "label": (i + model["bias"]) % 3} for i in ids]

    if BIND == "no-infer":
        nsml.bind(save=save, load=load)
    elif BIND == "none":
        pass
    else:
        nsml.bind(save=save, load=load, infer=infer)

    if args.pause:
        nsml.paused(scope=locals())
    print("training would start here")
''')


class PausedTest(unittest.TestCase):
    def setUp(self):
        self.runner = FakeRunner(session="demo/t1-cls/5")
        self.addCleanup(self.runner.close)
        self.tmp = tempfile.mkdtemp(prefix="nsml-submit-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.code = os.path.join(self.tmp, "code")
        os.makedirs(self.code)
        with open(os.path.join(self.code, "main.py"), "w") as fh:
            fh.write(ENTRY)
        # a submit's dataset: test data only, no labels
        self.dataset = os.path.join(self.tmp, "dataset")
        os.makedirs(os.path.join(self.dataset, "test", "test_data"))
        with open(os.path.join(self.dataset, "test", "test_data", "data.csv"), "w") as fh:
            fh.write("id,f1\n9,0.5\n2,0.1\n4,0.3\n")
        self.checkpoint = os.path.join(self.tmp, "checkpoint")
        os.makedirs(self.checkpoint)
        with open(os.path.join(self.checkpoint, "model.json"), "w") as fh:
            json.dump({"bias": 1}, fh)
        self.session_dir = os.path.join(self.tmp, "session")
        os.makedirs(self.session_dir)

    def submit_env(self, **extra):
        env = dict(
            NSML_SESSION="demo/t1-cls/6",
            NSML_DATASET_NAME="t1-cls",
            NSML_DATASET_PATH=self.dataset,
            NSML_GPU_NUM="0",
            NSML_SOCKET=self.runner.socket_path,
            NSML_SESSION_DIR=self.session_dir,
            NSML_MODE="test",
            NSML_CHECKPOINT_DIR=self.checkpoint,
            NSML_SUBMIT_KIND="trial",
        )
        env.update(extra)
        return clean_env(**env)

    def run_entry(self, env, args=("--mode", "test", "--pause", "1")):
        return run_python(["main.py"] + list(args), env, cwd=self.code)

    def test_submit_flow(self):
        proc = self.run_entry(self.submit_env())
        self.assertEqual(proc.returncode, 0, proc.stderr)
        lines = proc.stdout.splitlines()
        self.assertEqual(lines, ["loaded 1", "Infer done"])
        (req,) = self.runner.requests
        self.assertEqual(req, {"op": "predictions", "predictions": [
            {"id": 2, "label": 0}, {"id": 4, "label": 2}, {"id": 9, "label": 1},
        ]})

    def test_real_submit_kind(self):
        proc = self.run_entry(self.submit_env(NSML_SUBMIT_KIND="submit"))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(len(self.runner.ops("predictions")), 1)

    def test_missing_infer(self):
        proc = self.run_entry(self.submit_env(TEST_BIND="no-infer"))
        self.assertEqual(proc.returncode, 2)
        self.assertIn("no infer function is bound", proc.stderr)
        self.assertNotIn("Infer done", proc.stdout)
        self.assertEqual(self.runner.requests, [])

    def test_nothing_bound(self):
        proc = self.run_entry(self.submit_env(TEST_BIND="none"))
        self.assertEqual(proc.returncode, 2)
        self.assertIn("no load and no infer function is bound", proc.stderr)

    def test_unserialisable_predictions(self):
        proc = self.run_entry(self.submit_env(TEST_BIND="bad-output"))
        self.assertEqual(proc.returncode, 2)
        self.assertIn("not JSON-serialisable", proc.stderr)
        self.assertEqual(self.runner.requests, [])

    def test_predictions_refused(self):
        self.runner.fail["predictions"] = "expected 3 predictions, got 2"
        proc = self.run_entry(self.submit_env())
        self.assertEqual(proc.returncode, 1)
        self.assertIn("expected 3 predictions, got 2", proc.stderr)
        self.assertNotIn("Infer done", proc.stdout)

    def test_training_session_pause_returns(self):
        env = self.submit_env()
        del env["NSML_MODE"]
        proc = self.run_entry(env, args=("--pause", "1"))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("training would start here", proc.stdout)

    def test_off_platform_pause_returns(self):
        proc = self.run_entry(clean_env(), args=("--pause", "1"))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("paused: does nothing outside NSML", proc.stdout)
        self.assertIn("training would start here", proc.stdout)

    def test_local_dry_run_writes_predictions(self):
        env = clean_env(NSML_MODE="test", NSML_DATASET_PATH=self.dataset, NSML_CHECKPOINT_DIR=self.checkpoint)
        proc = self.run_entry(env)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("Infer done", proc.stdout)
        with open(os.path.join(self.code, "nsml_predictions.json")) as fh:
            self.assertEqual(len(json.load(fh)), 3)


if __name__ == "__main__":
    unittest.main()
