"""Baseline for the NSML demo competition (datasets t1-cls and t2-reg).

Pure Python, CPU only: softmax regression for t1-cls (labels in ``train_label``'s ``label``
column) and linear regression for t2-reg (``y`` column), trained with mini-batch SGD.

    nsml run -d t1-cls -g 0 -e main.py
    nsml run -d t2-reg -g 0 -e main.py -a "--epochs 10 --lr 0.05"
    nsml submit -t demo/t1-cls/1 4          # trial submit of checkpoint 4
    nsml submit demo/t1-cls/1 4

Off NSML:  NSML_DATASET_PATH=../datasets/t1-cls python3 main.py
"""

import argparse
import csv
import json
import math
import os
import random
import sys

try:
    import nsml
except ImportError:  # running from a checkout of the platform without the SDK installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "clients", "python"))
    import nsml
from nsml import DATASET_PATH


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_features(data_dir):
    """Return (ids, rows) from DATA_DIR/data.csv; each row is a list of floats."""
    records = read_csv(os.path.join(data_dir, "data.csv"))
    columns = [c for c in records[0].keys() if c != "id"] if records else []
    ids = [int(r["id"]) for r in records]
    rows = [[float(r[c]) for c in columns] for r in records]
    return ids, rows, columns


class Model:
    """Linear model: softmax regression (task "classification") or least squares ("regression")."""

    def __init__(self):
        self.task = None
        self.columns = []
        self.classes = []
        self.mean = []
        self.std = []
        self.weights = []  # one row of (n_features + 1) weights per output, bias last

    # --- set-up ---------------------------------------------------------------------------
    def init(self, task, columns, rows, classes=None):
        self.task = task
        self.columns = list(columns)
        self.classes = list(classes or [])
        n = len(rows)
        self.mean = [sum(r[j] for r in rows) / n for j in range(len(columns))]
        self.std = [
            math.sqrt(sum((r[j] - self.mean[j]) ** 2 for r in rows) / n) or 1.0 for j in range(len(columns))
        ]
        outputs = len(self.classes) if task == "classification" else 1
        self.weights = [[0.0] * (len(columns) + 1) for _ in range(outputs)]

    def features(self, row):
        return [(v - m) / s for v, m, s in zip(row, self.mean, self.std)] + [1.0]

    # --- prediction ---------------------------------------------------------------------
    def scores(self, x):
        return [sum(w * v for w, v in zip(ws, x)) for ws in self.weights]

    def probabilities(self, x):
        z = self.scores(x)
        top = max(z)
        e = [math.exp(v - top) for v in z]
        total = sum(e)
        return [v / total for v in e]

    def predict(self, row):
        x = self.features(row)
        if self.task == "classification":
            p = self.probabilities(x)
            return self.classes[max(range(len(p)), key=p.__getitem__)]
        return self.scores(x)[0]

    # --- training -----------------------------------------------------------------------
    def loss_and_grad(self, x, target):
        """Loss of one example and the gradient per output (to be multiplied by x)."""
        if self.task == "classification":
            p = self.probabilities(x)
            k = self.classes.index(target)
            grad = [pi - (1.0 if i == k else 0.0) for i, pi in enumerate(p)]
            return -math.log(max(p[k], 1e-12)), grad
        err = self.scores(x)[0] - target
        return err * err, [2.0 * err]

    def train_epoch(self, rows, targets, lr, rng, batch_size=16):
        order = list(range(len(rows)))
        rng.shuffle(order)
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            grads = [[0.0] * len(ws) for ws in self.weights]
            for i in batch:
                x = self.features(rows[i])
                loss, g = self.loss_and_grad(x, targets[i])
                total += loss
                for o, go in enumerate(g):
                    for j, xj in enumerate(x):
                        grads[o][j] += go * xj
            scale = lr / len(batch)
            for o, ws in enumerate(self.weights):
                for j in range(len(ws)):
                    ws[j] -= scale * grads[o][j]
        return total / len(rows)

    def evaluate(self, rows, targets):
        """Validation metric: accuracy (classification) or mean squared error (regression)."""
        preds = [self.predict(r) for r in rows]
        if self.task == "classification":
            return sum(p == t for p, t in zip(preds, targets)) / len(targets)
        return sum((p - t) ** 2 for p, t in zip(preds, targets)) / len(targets)

    # --- persistence --------------------------------------------------------------------
    def to_dict(self):
        return {
            "task": self.task,
            "columns": self.columns,
            "classes": self.classes,
            "mean": self.mean,
            "std": self.std,
            "weights": self.weights,
        }

    def from_dict(self, d):
        self.task = d["task"]
        self.columns = d["columns"]
        self.classes = d["classes"]
        self.mean = d["mean"]
        self.std = d["std"]
        self.weights = d["weights"]


def bind_model(model):
    def save(dir_path, **kwargs):
        with open(os.path.join(dir_path, "model.json"), "w", encoding="utf-8") as fh:
            json.dump(model.to_dict(), fh)
        print("model saved")

    def load(dir_path, **kwargs):
        with open(os.path.join(dir_path, "model.json"), encoding="utf-8") as fh:
            model.from_dict(json.load(fh))
        print("model loaded")

    def infer(path, **kwargs):
        ids, rows, _ = read_features(path)
        key = "label" if model.task == "classification" else "y"
        return [{"id": i, key: model.predict(r)} for i, r in sorted(zip(ids, rows))]

    nsml.bind(save=save, load=load, infer=infer)


def load_train(dataset_path):
    ids, rows, columns = read_features(os.path.join(dataset_path, "train", "train_data"))
    labels = read_csv(os.path.join(dataset_path, "train", "train_label"))
    label_columns = [c for c in labels[0].keys() if c != "id"]
    if "label" in label_columns:
        task, column, cast = "classification", "label", int
    elif "y" in label_columns:
        task, column, cast = "regression", "y", float
    else:
        sys.exit("unknown label columns %s in train_label" % label_columns)
    by_id = {int(r["id"]): cast(r[column]) for r in labels}
    targets = [by_id[i] for i in ids]
    return task, columns, rows, targets


def main():
    args = argparse.ArgumentParser()
    # reserved by NSML: --mode, --pause, --iteration
    args.add_argument("--mode", type=str, default="train")
    args.add_argument("--pause", type=int, default=0)
    args.add_argument("--iteration", type=str, default=None, help="checkpoint to resume training from")
    args.add_argument("--epochs", type=int, default=5)
    args.add_argument("--lr", type=float, default=0.1)
    args.add_argument("--batch-size", type=int, default=16)
    args.add_argument("--seed", type=int, default=0)
    config = args.parse_args()

    model = Model()
    bind_model(model)
    if config.pause:
        nsml.paused(scope=locals())

    if config.mode != "train":
        return

    if not nsml.HAS_DATASET:
        sys.exit("no dataset: run with `nsml run -d DATASET` or set NSML_DATASET_PATH to a dataset directory")

    task, columns, rows, targets = load_train(DATASET_PATH)
    rng = random.Random(config.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    n_val = len(order) // 5  # hold out 20% for validation
    val_idx, train_idx = order[:n_val], order[n_val:]
    train_rows, train_targets = [rows[i] for i in train_idx], [targets[i] for i in train_idx]
    val_rows, val_targets = [rows[i] for i in val_idx], [targets[i] for i in val_idx]

    start_epoch = 0
    if config.iteration:
        nsml.load(config.iteration)
        start_epoch = int(config.iteration) + 1 if config.iteration.isdigit() else 0
    else:
        model.init(task, columns, train_rows, classes=sorted(set(targets)) if task == "classification" else None)

    val_name = "val_acc" if model.task == "classification" else "val_mse"
    print("dataset=%s task=%s train=%d val=%d features=%s" % (
        nsml.DATASET_NAME or os.path.basename(os.path.normpath(DATASET_PATH)), model.task,
        len(train_rows), len(val_rows), ",".join(columns)))
    for epoch in range(start_epoch, start_epoch + config.epochs):
        lr = config.lr / (1.0 + 0.5 * epoch)  # simple decay
        train_loss = model.train_epoch(train_rows, train_targets, lr, rng, config.batch_size)
        val_metric = model.evaluate(val_rows, val_targets)
        print("epoch %d/%d train_loss=%.4f %s=%.4f" % (
            epoch + 1, start_epoch + config.epochs, train_loss, val_name, val_metric))
        metrics = {"train__loss": train_loss, val_name.replace("_", "__", 1): val_metric}
        nsml.report(summary=True, scope=locals(), step=epoch, epoch=epoch, **metrics)
        nsml.save(epoch)


if __name__ == "__main__":
    main()
