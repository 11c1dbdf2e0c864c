"""The demo competition in examples/: datasets are up to date and the baseline trains and submits."""

import csv
import json
import os
import re
import shutil
import sys
import tempfile
import unittest

from support import EXAMPLES_DIR, SDK_DIR, FakeRunner, clean_env, run_python

BASELINE = os.path.join(EXAMPLES_DIR, "baseline")
DATASETS = os.path.join(EXAMPLES_DIR, "datasets")
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) train_loss=([0-9.]+) (val_acc|val_mse)=([0-9.]+)$")


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def epochs(stdout):
    found = [EPOCH_LINE.match(line) for line in stdout.splitlines()]
    return [(int(m.group(1)), float(m.group(3)), m.group(4), float(m.group(5))) for m in found if m]


class DatasetsTest(unittest.TestCase):
    def test_generated_output_is_committed(self):
        proc = run_python([os.path.join(EXAMPLES_DIR, "generate.py"), "--check"], clean_env(), cwd=EXAMPLES_DIR)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)

    def test_layout(self):
        for name, label in (("t1-cls", "label"), ("t2-reg", "y")):
            root = os.path.join(DATASETS, name)
            seen = set()
            for split, data_dir, label_file, rows in (
                ("train", "train_data", "train_label", 600),
                ("test", "test_data", "test_label", 200),
                ("test_submit", "test_data", "test_label", 20),
            ):
                data = read_csv(os.path.join(root, split, data_dir, "data.csv"))
                labels = read_csv(os.path.join(root, split, label_file))
                self.assertEqual(len(data), rows)
                self.assertEqual([r["id"] for r in data], [r["id"] for r in labels])
                self.assertEqual(list(labels[0].keys()), ["id", label])
                ids = {r["id"] for r in data}
                self.assertFalse(ids & seen, "ids are disjoint across splits")
                seen |= ids
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(DATASETS) for f in fs)
        self.assertLess(size, 200 * 1024)

    def test_manifest_parses(self):
        if sys.version_info < (3, 11):
            self.skipTest("tomllib needs Python 3.11")
        import tomllib

        with open(os.path.join(EXAMPLES_DIR, "competition.toml"), "rb") as fh:
            manifest = tomllib.load(fh)
        self.assertEqual(set(manifest),
                         {"id", "title", "hosts", "policy", "datasets", "teams", "users", "environments"})
        for env in manifest["environments"]:
            self.assertTrue(env["name"] and os.path.isabs(env["python"]), env)
        for ds in manifest["datasets"]:
            self.assertTrue(os.path.isdir(os.path.join(EXAMPLES_DIR, ds["path"])))
        users = {u["name"] for u in manifest["users"]}
        self.assertTrue(set(manifest["hosts"]) <= users)
        self.assertTrue(all(set(t["members"]) <= users for t in manifest["teams"]))


class BaselineTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nsml-baseline-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.code = os.path.join(self.tmp, "code")
        shutil.copytree(BASELINE, self.code, ignore=shutil.ignore_patterns("nsml_checkpoints", "__pycache__",
                                                                           "nsml_predictions.json"))

    def submit_dataset(self, name, split):
        """A submit-time dataset: DATASET_PATH/test/test_data only."""
        root = os.path.join(self.tmp, "submit-%s-%s" % (name, split))
        shutil.copytree(os.path.join(DATASETS, name, split, "test_data"), os.path.join(root, "test", "test_data"))
        return root

    def check_training(self, proc, metric):
        self.assertEqual(proc.returncode, 0, proc.stderr)
        seen = epochs(proc.stdout)
        self.assertEqual([e[0] for e in seen], [1, 2, 3, 4, 5], proc.stdout)
        self.assertTrue(all(e[2] == metric for e in seen))
        losses = [e[1] for e in seen]
        self.assertLess(losses[-1], losses[0], "loss goes down")
        for before, after in zip(losses, losses[1:]):
            self.assertLessEqual(after, before * 1.01, "loss does not go up: %s" % losses)
        return seen

    def test_off_platform_both_datasets(self):
        for name, metric in (("t1-cls", "val_acc"), ("t2-reg", "val_mse")):
            with self.subTest(dataset=name):
                ckpts = os.path.join(self.code, "nsml_checkpoints")
                shutil.rmtree(ckpts, ignore_errors=True)
                env = clean_env(NSML_DATASET_PATH=os.path.join(DATASETS, name))
                seen = self.check_training(run_python(["main.py"], env, cwd=self.code), metric)
                final = seen[-1][3]
                if metric == "val_acc":
                    self.assertTrue(0.75 <= final < 1.0, final)
                else:
                    self.assertLess(final, 1.0)
                self.assertEqual(sorted(os.listdir(ckpts)), ["0", "1", "2", "3", "4"])
                for c in os.listdir(ckpts):
                    self.assertEqual(os.listdir(os.path.join(ckpts, c)), ["model.json"])

                # a local dry run of a trial submit from the last checkpoint
                dataset = self.submit_dataset(name, "test_submit")
                env = clean_env(NSML_MODE="test", NSML_DATASET_PATH=dataset,
                                NSML_CHECKPOINT_DIR=os.path.join(ckpts, "4"))
                proc = run_python(["main.py", "--mode", "test", "--pause", "1"], env, cwd=self.code)
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertEqual(proc.stdout.splitlines()[-1], "Infer done")
                with open(os.path.join(self.code, "nsml_predictions.json")) as fh:
                    predictions = json.load(fh)
                labels = read_csv(os.path.join(DATASETS, name, "test_submit", "test_label"))
                self.assertEqual([p["id"] for p in predictions], sorted(int(r["id"]) for r in labels))
                key = "label" if name == "t1-cls" else "y"
                self.assertTrue(all(set(p) == {"id", key} for p in predictions))

    def test_runs_from_a_checkout_without_pythonpath(self):
        # examples/baseline next to clients/python, as in the repository
        root = os.path.join(self.tmp, "checkout")
        os.makedirs(os.path.join(root, "examples"))
        os.makedirs(os.path.join(root, "clients"))
        shutil.copytree(self.code, os.path.join(root, "examples", "baseline"))
        os.symlink(SDK_DIR, os.path.join(root, "clients", "python"))
        env = clean_env(NSML_DATASET_PATH=os.path.join(DATASETS, "t1-cls"))
        del env["PYTHONPATH"]
        proc = run_python(["main.py", "--epochs", "2"], env, cwd=os.path.join(root, "examples", "baseline"))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(len(epochs(proc.stdout)), 2)

    def test_no_dataset(self):
        proc = run_python(["main.py"], clean_env(), cwd=self.code)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("NSML_DATASET_PATH", proc.stderr)

    def test_on_platform_train_then_submit(self):
        runner = FakeRunner(session="demo/t1-cls/1")
        self.addCleanup(runner.close)
        session_dir = os.path.join(self.tmp, "session")
        os.makedirs(session_dir)
        env = clean_env(
            NSML_SESSION="demo/t1-cls/1", NSML_DATASET_NAME="t1-cls",
            NSML_DATASET_PATH=os.path.join(DATASETS, "t1-cls"), NSML_GPU_NUM="0",
            NSML_SOCKET=runner.socket_path, NSML_SESSION_DIR=session_dir,
        )
        self.check_training(run_python(["main.py"], env, cwd=self.code), "val_acc")
        self.assertFalse(os.path.exists(os.path.join(self.code, "nsml_checkpoints")))
        reports = runner.ops("report")
        self.assertEqual([r["step"] for r in reports], [0, 1, 2, 3, 4])
        self.assertTrue(all(r["summary"] for r in reports))
        self.assertEqual(set(reports[-1]["metrics"]), {"epoch", "train__loss", "val__acc"})
        self.assertEqual([s["checkpoint"] for s in runner.ops("save")], ["0", "1", "2", "3", "4"])

        # real submit of checkpoint 4 on the hidden test set
        env = clean_env(
            NSML_SESSION="demo/t1-cls/2", NSML_DATASET_NAME="t1-cls",
            NSML_DATASET_PATH=self.submit_dataset("t1-cls", "test"), NSML_GPU_NUM="0",
            NSML_SOCKET=runner.socket_path, NSML_SESSION_DIR=session_dir, NSML_MODE="test",
            NSML_CHECKPOINT_DIR=runner.checkpoint_dir("4"), NSML_SUBMIT_KIND="submit",
        )
        proc = run_python(["main.py", "--mode", "test", "--pause", "1"], env, cwd=self.code)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("Infer done", proc.stdout)
        (sent,) = runner.ops("predictions")
        truth = {int(r["id"]): int(r["label"]) for r in read_csv(os.path.join(DATASETS, "t1-cls", "test", "test_label"))}
        predictions = sent["predictions"]
        self.assertEqual([p["id"] for p in predictions], sorted(truth))
        accuracy = sum(truth[p["id"]] == p["label"] for p in predictions) / len(truth)
        self.assertGreater(accuracy, 0.8)

    def test_resume_from_iteration(self):
        env = clean_env(NSML_DATASET_PATH=os.path.join(DATASETS, "t2-reg"))
        self.assertEqual(run_python(["main.py", "--epochs", "2"], env, cwd=self.code).returncode, 0)
        proc = run_python(["main.py", "--epochs", "2", "--iteration", "1"], env, cwd=self.code)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual([e[0] for e in epochs(proc.stdout)], [3, 4])
        self.assertEqual(sorted(os.listdir(os.path.join(self.code, "nsml_checkpoints"))), ["0", "1", "2", "3"])


if __name__ == "__main__":
    unittest.main()
