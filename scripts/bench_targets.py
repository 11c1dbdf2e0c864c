"""The table `scripts/bench-targets` ends with: each cost target of the platform, the figure measured for it in
that run, its anchor where the run measured one, and whether the figure meets the target.

    bench_targets.py DIR

DIR holds the parts' outputs (NAME.txt). A part that did not run, or a line a part did not print, shows as "not
measured"; such a target counts as not met.
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_mlflow  # noqa: E402  (the anchors' own reader of the MLflow and checkpoint outputs)

NUM = r"([0-9][0-9,]*\.?[0-9]*)"


def num(text):
    return float(text.replace(",", ""))


def n(v):
    """A figure as the table prints it: whole, with thousands separated; "?" where it was not measured."""
    return "?" if v is None else "{:,.0f}".format(v)


def read(out, name):
    path = os.path.join(out, name + ".txt")
    return open(path).read() if os.path.exists(path) else ""


def find(text, pattern, group=1):
    m = re.search(pattern, text, re.M)
    return num(m.group(group)) if m else None


class Table:
    def __init__(self):
        self.rows = []

    def row(self, target, figure, fmt, ok, anchor=""):
        """`ok(figure)` says whether the figure meets the target; None where the figure was not measured."""
        if figure is None:
            self.rows.append((target, "not measured", anchor, "no"))
        else:
            self.rows.append((target, fmt.format(figure), anchor, "yes" if ok(figure) else "**no**"))

    def note(self, what, figure, fmt, anchor=""):
        """A figure the targets do not bound, printed for its anchor."""
        self.rows.append((what, "not measured" if figure is None else fmt.format(figure), anchor, "—"))

    def print(self):
        print("| target | measured | anchor, same run | met |")
        print("| --- | --- | --- | --- |")
        for r in self.rows:
            print("| %s |" % " | ".join(r))
        met = sum(1 for r in self.rows if r[3] == "yes")
        bound = sum(1 for r in self.rows if r[3] != "—")
        print()
        print("%d of %d targets met on this machine." % (met, bound))


def admissions(text, who):
    """(p50 ms, p99 ms, per s) of an admissions row of `nsml-bench`."""
    m = re.search(r"^admissions, %s +%s ?ms +%s ?ms +%s/s" % (re.escape(who), NUM, NUM, NUM), text, re.M)
    return tuple(num(g) for g in m.groups()) if m else (None, None, None)


def table(out):
    """The table of the parts' outputs in `out`."""
    t = Table()
    default, kept, refused = read(out, "default"), read(out, "kept"), read(out, "refused")
    large, audit, replay, slurm = read(out, "large"), read(out, "audit"), read(out, "replay"), read(out, "slurm")

    # Memory, on the large log.
    seeded = find(large, r"^seeded %s events" % NUM)
    t.note("the large log (seeded with the events the services append)", seeded, "{:,.0f} events")
    t.row("boot from the large log → SERVING ≤ 10 s", find(large, r"^boot: start -> health SERVING +%s ?s" % NUM),
          "{:.1f} s", lambda v: v <= 10)
    rss = re.search(r"^nsmld RSS after boot / after queries +%s MiB +%s MiB" % (NUM, NUM), large, re.M)
    t.row("resident memory on the large log ≤ 1 GB (after boot, after the queries)",
          max(num(rss.group(1)), num(rss.group(2))) if rss else None, "{:,.0f} MiB", lambda v: v <= 1024)
    for what, label, bound in (("Board", r"Board \(\d+ rows\)", 5), ("Overall", r"Overall \(\d+ rows\)", 10),
                               ("History", r"History, the team's \(\d+ entries\)", 10)):
        t.row("%s p99 ≤ %d ms on the large log" % (what, bound),
              find(large, r"^%s +%s ?ms +%s ?ms" % (label, NUM, NUM), 2), "{:.2f} ms", lambda v, b=bound: v <= b)
    # Over the run's second half, once the bounded caches are warm (a short run prints only the whole).
    kept_half = find(kept, r"^growth per kept session over the second half .*: %s KiB" % NUM)
    t.row("growth per kept session ≤ 2 KB" + (" (the run's second half)" if kept_half is not None else ""),
          kept_half if kept_half is not None else find(kept, r"^growth per kept session: %s KiB" % NUM),
          "{:.1f} KiB", lambda v: v <= 2 * 1000 / 1024)
    t.note("growth per refused admission", find(refused, r"^growth per refused admission: %s KiB" % NUM), "{:.2f} KiB")

    # Checkpoints, against `cp; sync` and MLflow.
    parts = [os.path.join(out, "mlflow-%s.txt" % f) for f in ("mlflow", "reports", "checkpoints", "board")]
    ours, theirs = {}, {}
    if all(os.path.exists(p) for p in parts[:3]):
        ours, theirs = bench_mlflow.figures(*parts[:3], board=parts[3] if os.path.exists(parts[3]) else None)
    sizes = sorted({k[1] for k in ours if k[0] == "save"})
    for mb in sizes or [1024]:
        save, cp, part = ours.get(("save", mb)), ours.get(("cp", mb)), ours.get(("part", mb))
        upload = theirs.get(("write+log_artifact", mb))
        cp_anchor = "`cp; sync` %s MB/s" % n(cp) if cp else ""
        t.row("%d MB `nsml.save` ≥ 1 GB/s" % mb, save, "{:,.0f} MB/s", lambda v: v >= 1000, cp_anchor)
        t.row("%d MB `nsml.save` ≥ 70 %% of `cp; sync`" % mb, save / cp if save and cp else None, "{:.2f}×",
              lambda v: v >= 0.7, cp_anchor)
        t.row("%d MB `nsml.save` ≥ 4× MLflow's write + `log_artifact`" % mb,
              save / upload if save and upload else None, "{:.1f}×", lambda v: v >= 4,
              "MLflow %s MB/s" % n(upload) if upload else "")
        t.note("%d MB: the platform's part of `nsml.save` (the call less the session's own write)" % mb, part,
               "{:,.0f} MB/s", "MLflow `log_artifact` of a written file %s MB/s" % n(theirs[("log_artifact", mb)])
               if ("log_artifact", mb) in theirs else "")
        download = theirs.get(("download_artifacts", mb))
        for what, key in (("`nsml.load`", "load"), ("`nsml model pull`", "pull")):
            t.row("%d MB %s ≥ 1 GB/s" % (mb, what), ours.get((key, mb)), "{:,.0f} MB/s", lambda v: v >= 1000,
                  "MLflow `download_artifacts` %s MB/s" % n(download) if download else "")

    # Distributed against embedded.
    e16, e1 = admissions(default, "16 clients, embedded"), admissions(default, "1 client, embedded")
    d16, d1 = admissions(default, "16 clients, distributed"), admissions(default, "1 client, distributed")
    t.row("distributed admissions from 16 clients ≥ 5,000/s", d16[2], "{:,.0f}/s", lambda v: v >= 5000)
    t.row("distributed within 2× of embedded (16 clients)", d16[2] / e16[2] if d16[2] and e16[2] else None,
          "{:.2f} of embedded", lambda v: v >= 0.5, "embedded %s/s" % n(e16[2]) if e16[2] else "")
    t.row("distributed p50 from 1 client ≤ 2 ms", d1[0], "{:.2f} ms", lambda v: v <= 2,
          "embedded %.2f ms" % e1[0] if e1[0] else "")
    cpu = find(default, r"CPU per admission, 16 clients, distributed: %s µs" % NUM)
    t.note("CPU per distributed admission, the whole machine", cpu, "{:,.0f} µs")

    # The command line against Slurm.
    cli = re.search(r"^\| `nsml run` .*p50 \| %s ms \| %s ms \| %s×" % (NUM, NUM, NUM), slurm, re.M)
    t.row("`nsml run` of an unchanged directory ≤ `sbatch --hold` (p50, whole processes)",
          num(cli.group(3)) if cli else None, "{:.2f}×", lambda v: v <= 1,
          "`sbatch --hold` %s ms, `nsml run` %s ms" % (cli.group(1), cli.group(2)) if cli else "")

    # Start and replay.
    start_line = r"^run -> entry process started +%s ?ms" % NUM
    t.row("`run` → entry started p50 ≤ 30 ms (embedded; the `python3` on PATH)", find(default, start_line),
          "{:.1f} ms", lambda v: v <= 30, read(out, "python").strip())
    stock = read(out, "start")
    if stock:
        t.row("`run` → entry started p50 ≤ 30 ms (embedded; Debian's `/usr/bin/python3`)", find(stock, start_line),
              "{:.1f} ms", lambda v: v <= 30)
    t.row("audit replay from SQLite ≥ 1 M events/s (generated ledger)",
          find(replay, r"^replay from SQLite \(whole log\): median %s events/s" % NUM), "{:,.0f} events/s",
          lambda v: v >= 1e6, "in memory %s events/s" % n(find(replay, r"^replay in memory: median %s" % NUM)))
    audit_line = r"^audit replay of every ledger .*?: %s ledger events.*median %s events/s in the service" % (NUM, NUM)
    t.row("`nsml admin audit replay` of a real ~30,000-event log ≥ 1 M events/s", find(audit, audit_line, 2),
          "{:,.0f} events/s", lambda v: v >= 1e6, "of %s ledger events" % n(find(audit, audit_line)))
    t.note("`nsml admin audit replay` of the large log", find(large, audit_line, 2), "{:,.0f} events/s",
           "of %s ledger events" % n(find(large, audit_line)))

    # What is ahead, kept.
    t.row("embedded admissions from 16 clients ≥ 9,000/s", e16[2], "{:,.0f}/s", lambda v: v >= 9000)
    t.row("embedded admissions from 16 clients p99 ≤ 5 ms", e16[1], "{:.2f} ms", lambda v: v <= 5)
    one = ours.get(("one", None))
    t.row("metric reports ≥ 3,500 calls/s", one, "{:,.0f} calls/s", lambda v: v >= 3500,
          "MLflow `log_metric` %s/s" % n(theirs.get(("log_metric", None))))
    bulk = ours.get(("bulk", None))
    t.note("metrics, 1,000 per call", bulk, "{:,.0f} metrics/s",
           "MLflow `log_batch` %s metrics/s" % n(theirs.get(("log_batch", None))))
    for runs in sorted(k[1] for k in theirs if k[0] == "search_runs"):
        t.note("`Board` of %s teams, p50" % n(runs), ours.get(("board", runs)), "{:.2f} ms",
               "MLflow `search_runs` over %s runs %s ms" % (n(runs), n(theirs[("search_runs", runs)])))
    t.row("idle `nsmld up` resident memory ≤ 30 MB", find(default, r"^idle nsmld up resident memory +%s ?MB" % NUM),
          "{:.1f} MB", lambda v: v <= 30)
    return t


if __name__ == "__main__":
    table(sys.argv[1]).print()
