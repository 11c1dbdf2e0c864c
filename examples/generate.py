#!/usr/bin/env python3
"""Generate the demo competition's datasets in NSML layout (deterministic, standard library only).

    python3 examples/generate.py                # (re)writes examples/datasets/
    python3 examples/generate.py --out DIR      # writes DIR/t1-cls and DIR/t2-reg
    python3 examples/generate.py --check        # exits 1 if examples/datasets/ differs from a fresh run

Each dataset directory looks like this:

    train/train_data/data.csv       id,f1,...        (600 rows)
    train/train_label               id,label | id,y
    test/test_data/data.csv         id,f1,...        (200 rows, hidden test set)
    test/test_label                 id,label | id,y
    test_submit/test_data/data.csv  id,f1,...        (20 rows, trial submits)
    test_submit/test_label          id,label | id,y

Ids are integers, unique across the three splits of a dataset.
"""

import argparse
import filecmp
import math
import os
import random
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "datasets")

SPLITS = (("train", 600), ("test", 200), ("test_submit", 20))

# t1-cls: three Gaussian clusters in 4-D with unit spread; the centres are close enough that the
# clusters overlap and a linear classifier reaches roughly 0.85 accuracy.
T1_CENTRES = (
    (0.0, 0.0, 0.0, 0.0),
    (1.6, 0.9, -0.4, 0.6),
    (0.3, 1.7, 1.3, -0.7),
)
T1_SPREAD = 0.8

# t2-reg: y = 3 + 2 f1 - 1.5 f2 + 0.5 f3 + 0.4 f1^2 - 0.3 sin(2 f3) + N(0, 0.5^2)
T2_NOISE = 0.5


def _t2_target(f1, f2, f3, rng):
    return 3.0 + 2.0 * f1 - 1.5 * f2 + 0.5 * f3 + 0.4 * f1 * f1 - 0.3 * math.sin(2.0 * f3) + rng.gauss(0.0, T2_NOISE)


def make_t1(rng):
    rows = []
    for _ in range(sum(n for _, n in SPLITS)):
        label = rng.randrange(3)
        centre = T1_CENTRES[label]
        features = [c + rng.gauss(0.0, T1_SPREAD) for c in centre]
        rows.append((features, label))
    return ["f1", "f2", "f3", "f4"], "label", rows


def make_t2(rng):
    rows = []
    for _ in range(sum(n for _, n in SPLITS)):
        f1 = rng.uniform(-2.0, 2.0)
        f2 = rng.gauss(0.0, 1.0)
        f3 = rng.uniform(-1.5, 1.5)
        rows.append(([f1, f2, f3], _t2_target(f1, f2, f3, rng)))
    return ["f1", "f2", "f3"], "y", rows


def _fmt(value):
    if isinstance(value, float):
        return "%.4f" % value
    return str(value)


def _write_csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(",".join(header) + "\n")
        for row in rows:
            fh.write(",".join(_fmt(v) for v in row) + "\n")


def write_dataset(root, name, seed, maker):
    rng = random.Random(seed)
    feature_names, label_name, rows = maker(rng)
    ids = list(range(1, len(rows) + 1))
    rng.shuffle(ids)
    start = 0
    for split, count in SPLITS:
        chunk = sorted(zip(ids[start:start + count], rows[start:start + count]))
        start += count
        base = os.path.join(root, name, split)
        data_dir = os.path.join(base, "train_data" if split == "train" else "test_data")
        label_file = os.path.join(base, "train_label" if split == "train" else "test_label")
        _write_csv(os.path.join(data_dir, "data.csv"), ["id"] + feature_names,
                   [[i] + feats for i, (feats, _) in chunk])
        _write_csv(label_file, ["id", label_name], [[i, label] for i, (_, label) in chunk])


def generate(out):
    write_dataset(out, "t1-cls", 1001, make_t1)
    write_dataset(out, "t2-reg", 2002, make_t2)


def _same_tree(a, b):
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(_same_tree(os.path.join(a, d), os.path.join(b, d)) for d in cmp.common_dirs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: examples/datasets)")
    parser.add_argument("--check", action="store_true", help="compare --out with a fresh generation instead of writing")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(tmp)
            if not _same_tree(tmp, args.out):
                print("%s differs from the generator's output; run examples/generate.py" % args.out)
                return 1
        print("%s is up to date" % args.out)
        return 0
    generate(args.out)
    print("datasets written to %s" % args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
