"""MLflow's figures for the anchors `scripts/bench-mlflow` sets beside the platform's: metric logging, artifact
upload and download, and (with `--search-runs`) a search of runs ordered by a metric, against an MLflow tracking
server on this machine (SQLite backend, artifacts served by the server, as `mlflow server` sets them up).

Run by `scripts/bench-mlflow` with the MLflow venv's Python:
    bench_mlflow.py measure URI --calls N --batches N --sizes 200,1024 --runs N --dir DIR
        [--search-runs N --backend STORE_URI --artifacts DIR]
    bench_mlflow.py compare MLFLOW_OUT REPORTS_OUT CHECKPOINTS_OUT [--board LARGE_LOG_OUT]

`measure` prints one line per figure, in the form `compare` reads back.
"""
import argparse
import os
import re
import shutil
import statistics
import sys
import time


def measure(args):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=args.uri)
    experiment = client.create_experiment("bench-%d" % int(time.time() * 1000))
    run_id = client.create_run(experiment).info.run_id

    # One metric per call, each call answered before the next: `nsml.report(step=i, train__loss=…)`'s match.
    t = time.perf_counter()
    for i in range(args.calls):
        client.log_metric(run_id, "train_loss", 1.0 / (i + 1), step=i)
    one = time.perf_counter() - t
    got = len(client.get_metric_history(run_id, "train_loss"))
    if got != args.calls:
        sys.exit("MLflow holds %d of the %d points logged" % (got, args.calls))
    print("FIGURE mlflow log_metric calls/s %.1f (%d calls in %.2f s)" % (args.calls / one, args.calls, one))

    # 1,000 metrics per call (log_batch's most).
    names = ["m%04d" % k for k in range(1000)]
    t = time.perf_counter()
    for i in range(args.batches):
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(n, i + k / 1000.0, now, args.calls + i) for k, n in enumerate(names)])
    bulk = time.perf_counter() - t
    metrics = args.batches * len(names)
    print("FIGURE mlflow log_batch metrics/s %.1f (%d metrics in %.2f s)" % (metrics / bulk, metrics, bulk))

    if args.search_runs > 0:
        search_runs(client, args)

    # Artifacts: a file of random blocks (as the platform's bench writes), written, then uploaded with
    # log_artifact and downloaded with download_artifacts, each run under a path of its own.
    block = os.urandom(64 << 20)
    view = memoryview(block)
    for mb in args.sizes:
        size = mb << 20
        writes, uploads, downloads = [], [], []
        for r in range(args.runs):
            src = os.path.join(args.dir, "model-%d-%d" % (mb, r))
            os.makedirs(src)
            path = os.path.join(src, "model.bin")
            t = time.perf_counter()
            with open(path, "wb") as f:
                left = size
                while left > 0:
                    n = min(left, len(block))
                    f.write(view[:n])
                    left -= n
            writes.append(time.perf_counter() - t)
            t = time.perf_counter()
            client.log_artifact(run_id, path, artifact_path="ckpt-%d-%d" % (mb, r))
            uploads.append(time.perf_counter() - t)
            shutil.rmtree(src)
            dst = os.path.join(args.dir, "pull-%d-%d" % (mb, r))
            os.makedirs(dst)
            t = time.perf_counter()
            got = client.download_artifacts(run_id, "ckpt-%d-%d" % (mb, r), dst)
            downloads.append(time.perf_counter() - t)
            pulled = os.path.getsize(os.path.join(got, "model.bin"))
            if pulled != size:
                sys.exit("downloaded %d bytes of %d" % (pulled, size))
            shutil.rmtree(dst)
        rate = lambda secs: size / secs / 1e6  # noqa: E731
        up, down = statistics.median(uploads), statistics.median(downloads)
        both = statistics.median(w + u for w, u in zip(writes, uploads))
        print("FIGURE mlflow log_artifact %d MB/s %.1f (median of %d, s: %s)"
              % (mb, rate(up), args.runs, " ".join("%.2f" % u for u in uploads)))
        print("FIGURE mlflow write+log_artifact %d MB/s %.1f" % (mb, rate(both)))
        print("FIGURE mlflow download_artifacts %d MB/s %.1f (median of %d, s: %s)"
              % (mb, rate(down), args.runs, " ".join("%.2f" % d for d in downloads)))


def search_runs(client, args):
    """`search_runs` over `args.search_runs` runs of one experiment, each with a `score`, ordered by it (a board
    of that many teams), through the server. The runs are seeded straight into the server's store with MLflow's
    own `SqlAlchemyStore`, as the server itself would write them: over HTTP, 400 runs took 13.6 s from 8 threads
    (10,000 would take about 6 minutes)."""
    from mlflow.entities import Metric
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(args.backend, args.artifacts)
    experiment = store.create_experiment("board-%d" % int(time.time() * 1000))
    t = time.perf_counter()
    for i in range(args.search_runs):
        now = int(time.time() * 1000)
        run_id = store.create_run(experiment, user_id="bench", start_time=now, tags=[], run_name="team-%d" % i).info.run_id
        # Scores spread over [0, 1) in an order unrelated to the runs' (10,007 is prime).
        store.log_batch(run_id, metrics=[Metric("score", (i * 7919 % 10007) / 10007.0, now, 0)], params=[], tags=[])
    seeded = time.perf_counter() - t
    took = []
    for _ in range(args.queries):
        t = time.perf_counter()
        runs = client.search_runs([experiment], order_by=["metrics.score DESC"], max_results=args.search_runs)
        took.append(time.perf_counter() - t)
        if len(runs) != args.search_runs:
            sys.exit("search_runs answered %d runs of %d" % (len(runs), args.search_runs))
    print("FIGURE mlflow search_runs %d ms %.1f (p50 of %d, each s: %s; seeded in %.0f s)"
          % (args.search_runs, 1000 * statistics.median(took), args.queries, " ".join("%.2f" % x for x in took), seeded))


FIGURE = re.compile(r"^FIGURE mlflow (\S+) (?:(\d+) )?(\S+) ([0-9.]+)")
REPORTS = re.compile(r"^reports, (one metric per call|1,000 metrics per call) +([0-9.]+) ")
CHECKPOINT = re.compile(
    r"^ *(\d+) MB \| +(\d+) MB/s +[0-9.]+s \| +\d+ MB/s +[0-9.]+s \| +(\d+) MB/s \| +(\d+) MB/s +[0-9.]+s \| "
    r"+(\d+) MB/s"
)

BOARD = re.compile(r"^Board \((\d+) rows\) +([0-9.]+)ms")
PLATFORMS_PART = re.compile(r"the platform's part of nsml\.save \(the call less the write\): (\d+) MB/s")


def figures(mlflow, reports, checkpoints, board=None):
    """Both sides' figures, read back from the outputs: (ours, theirs), each keyed by (measure, size in MiB or
    a count, or None)."""
    ours, theirs = {}, {}
    for line in open(mlflow):
        m = FIGURE.match(line)
        if m:
            what, mb, _unit, value = m.groups()
            theirs[(what, int(mb) if mb else None)] = float(value)
    for line in open(reports):
        m = REPORTS.match(line)
        if m:
            ours[("one" if m.group(1).startswith("one") else "bulk", None)] = float(m.group(2))
    if board:
        for line in open(board):
            m = BOARD.match(line)
            if m:
                ours[("board", int(m.group(1)))] = float(m.group(2))
    size = None
    for line in open(checkpoints):
        m = CHECKPOINT.match(line)
        if m:
            size, save, cp, load, pull = (int(g) for g in m.groups())
            ours[("save", size)], ours[("load", size)], ours[("pull", size)] = save, load, pull
            ours[("cp", size)] = cp
        m = PLATFORMS_PART.search(line)
        if m and size is not None:
            ours[("part", size)] = int(m.group(1))
    return ours, theirs


def compare(args):
    ours, theirs = figures(args.mlflow, args.reports, args.checkpoints, args.board)

    rows = [
        ("metric reports, one metric per call (calls/s)", ("one", None), ("log_metric", None)),
        ("metrics, 1,000 per call (metrics/s)", ("bulk", None), ("log_batch", None)),
    ]
    for n in sorted(k[1] for k in theirs if k[0] == "search_runs"):
        rows.append(("a board of %d teams: `Board` p50 against `search_runs` ordered by the score, p50 (ms; lower "
                     "is better, the ratio is MLflow's time over the platform's)" % n, ("board", n), ("search_runs", n)))
    for mb in sorted({k[1] for k in theirs if k[1] is not None and k[0] != "search_runs"}):
        rows += [
            ("%d MB checkpoint: `nsml.save` (with the session's own write) against write + `log_artifact` (MB/s)" % mb,
             ("save", mb), ("write+log_artifact", mb)),
            ("%d MB checkpoint: `nsml.save` against `log_artifact` of a file already written (MB/s)" % mb,
             ("save", mb), ("log_artifact", mb)),
            ("%d MB checkpoint: the platform's part of `nsml.save` (the call less the session's write) against "
             "`log_artifact` of a file already written (MB/s)" % mb, ("part", mb), ("log_artifact", mb)),
            ("%d MB checkpoint: `nsml.load` against `download_artifacts` (MB/s)" % mb, ("load", mb),
             ("download_artifacts", mb)),
            ("%d MB checkpoint: `nsml model pull` against `download_artifacts` (MB/s)" % mb, ("pull", mb),
             ("download_artifacts", mb)),
        ]
    print("| measure | this platform | MLflow | ratio |")
    print("| --- | --- | --- | --- |")
    for what, o, t in rows:
        if o in ours and t in theirs and o[0] == "board":
            print("| %s | %.2f | %.0f | %.0f× |" % (what, ours[o], theirs[t], theirs[t] / ours[o]))
        elif o in ours and t in theirs:
            print("| %s | %.0f | %.0f | %.1f× |" % (what, ours[o], theirs[t], ours[o] / theirs[t]))
        else:
            print("| %s | %s | %s | |" % (what, ours.get(o, "—"), theirs.get(t, "—")))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("uri")
    m.add_argument("--calls", type=int, default=500)
    m.add_argument("--batches", type=int, default=50)
    m.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",") if x.strip()], default=[200, 1024])
    m.add_argument("--runs", type=int, default=3)
    m.add_argument("--dir", required=True)
    m.add_argument("--search-runs", type=int, default=0)
    m.add_argument("--queries", type=int, default=5)
    m.add_argument("--backend", help="the server's backend store URI (for seeding the runs search_runs reads)")
    m.add_argument("--artifacts", help="the server's artifact destination")
    c = sub.add_parser("compare")
    c.add_argument("mlflow")
    c.add_argument("reports")
    c.add_argument("checkpoints")
    c.add_argument("--board", help="nsml-bench --large-log's output, for the board row")
    args = p.parse_args()
    measure(args) if args.cmd == "measure" else compare(args)


if __name__ == "__main__":
    main()
