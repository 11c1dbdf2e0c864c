// Plots of every metric a session reported with `nsml.report`, followed live, with other sessions overlaid
// the way `nsml plot` overlaid them.
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import type uPlot from "uplot";
import { sessions } from "../api";
import type { MetricsResponse } from "../gen/nsml/v1/session_pb";
import { metricName, metricsOf, num } from "../format";
import { follow } from "../live";
import { PALETTE, Plot } from "./plot";
import { Empty } from "./ui";

interface Point {
  step: number;
  values: Map<string, number>;
}

interface Series {
  points: Point[];
  error: string | null;
}

export function Metrics(p: { name: string; candidates: string[] }) {
  const [overlay, setOverlay] = useState<string[]>([]);
  const [adding, setAdding] = useState("");
  const store = useRef(new Map<string, Series>());
  const frame = useRef(0);
  const [version, setVersion] = useState(0);
  const shown = useMemo(() => [p.name, ...overlay.filter((o) => o !== p.name)], [p.name, overlay]);

  useEffect(() => setOverlay([]), [p.name]);

  // One live stream per session shown.
  useEffect(() => {
    const bump = () => {
      if (!frame.current)
        frame.current = requestAnimationFrame(() => {
          frame.current = 0;
          setVersion((v) => v + 1);
        });
    };
    const acs = shown.map((name) => {
      const s: Series = { points: [], error: null };
      store.current.set(name, s);
      const ac = new AbortController();
      void follow<MetricsResponse>(
        ac.signal,
        (signal) => sessions.watchMetrics({ name }, { signal }),
        {
          message: (m, first) => {
            // The first message of each (re)opened stream holds every point so far; later ones only new points.
            if (first) s.points = [];
            for (const pt of m.points) {
              const values = new Map<string, number>();
              for (const [k, v] of metricsOf(pt.metricsJson)) if (typeof v === "number" && Number.isFinite(v)) values.set(k, v);
              if (values.size) s.points.push({ step: num(pt.step), values });
            }
            bump();
          },
          error: (e) => {
            s.error = e;
            bump();
          },
        },
        (signal) => sessions.metrics({ name }, { signal }),
        5000,
      );
      return ac;
    });
    bump();
    return () => {
      for (const ac of acs) ac.abort();
      cancelAnimationFrame(frame.current);
      frame.current = 0;
      store.current = new Map();
    };
  }, [shown.join("\n")]);

  const charts = useMemo(() => build(shown, store.current), [version, shown.join("\n")]);
  const errors = shown.map((n) => [n, store.current.get(n)?.error] as const).filter(([, e]) => e);
  const options = p.candidates.filter((c) => !shown.includes(c));

  return (
    <div class="metrics" data-testid="metrics">
      <div class="overlay-bar">
        <div class="chips">
          {shown.map((n, i) => (
            <span class="chip" key={n} data-testid="overlay-chip">
              <span class="swatch" style={{ background: PALETTE[i % PALETTE.length] }} />
              {n}
              {i > 0 && (
                <button
                  class="chip-x"
                  aria-label={`Remove ${n}`}
                  onClick={() => setOverlay((o) => o.filter((x) => x !== n))}
                >
                  ×
                </button>
              )}
            </span>
          ))}
        </div>
        <form
          class="overlay-add"
          onSubmit={(e) => {
            e.preventDefault();
            const n = adding.trim();
            if (n && !shown.includes(n)) setOverlay((o) => [...o, n]);
            setAdding("");
          }}
        >
          <input
            list="overlay-sessions"
            placeholder="Overlay another session (TEAM/DATASET/N)"
            value={adding}
            onInput={(e) => setAdding((e.target as HTMLInputElement).value)}
            data-testid="overlay-input"
          />
          <datalist id="overlay-sessions">
            {options.map((o) => (
              <option value={o} key={o} />
            ))}
          </datalist>
          <button class="btn btn-small" type="submit" data-testid="overlay-add">
            Add
          </button>
        </form>
      </div>
      {errors.map(([n, e]) => (
        <div class="error" role="alert" key={n} data-testid="error">
          {n}: {e}
        </div>
      ))}
      {charts.length === 0 ? (
        <Empty title="No metrics reported yet." testid="metrics-empty">
          Metrics show here as the training code calls <code>nsml.report(step=…, train__loss=…)</code>; keys with{" "}
          <code>__</code> group as <code>train/loss</code>.
        </Empty>
      ) : (
        <div class="plots">
          {charts.map((c) => (
            <Plot key={c.key} title={c.title} labels={c.labels} data={c.data} />
          ))}
        </div>
      )}
    </div>
  );
}

interface Chart {
  key: string;
  title: string;
  labels: string[];
  data: uPlot.AlignedData;
}

/** One chart per metric key, its x the union of the steps, one series per session (gaps where a session has none). */
function build(shown: string[], store: Map<string, Series>): Chart[] {
  const keys = new Map<string, Map<string, Map<number, number>>>(); // key → session → step → value
  for (const name of shown) {
    const s = store.get(name);
    if (!s) continue;
    // Code that reports without a step gets its points in order.
    const noSteps = s.points.length > 1 && s.points.every((pt) => pt.step === 0);
    s.points.forEach((pt, i) => {
      const x = noSteps ? i : pt.step;
      for (const [k, v] of pt.values) {
        let bySession = keys.get(k);
        if (!bySession) keys.set(k, (bySession = new Map()));
        let steps = bySession.get(name);
        if (!steps) bySession.set(name, (steps = new Map()));
        steps.set(x, v);
      }
    });
  }
  const out: Chart[] = [];
  for (const k of [...keys.keys()].sort(byGroup)) {
    const bySession = keys.get(k)!;
    const xs = new Set<number>();
    for (const steps of bySession.values()) for (const x of steps.keys()) xs.add(x);
    const xsSorted = Float64Array.from(xs).sort();
    const ys = shown.map((name) => {
      const steps = bySession.get(name);
      return Array.from(xsSorted, (x) => (steps?.has(x) ? steps.get(x)! : null));
    });
    out.push({ key: k, title: metricName(k), labels: shown, data: [Array.from(xsSorted), ...ys] as uPlot.AlignedData });
  }
  return out;
}

// `train__loss` next to `train__acc`, before ungrouped keys in name order.
function byGroup(a: string, b: string): number {
  const ga = a.includes("__") ? 0 : 1;
  const gb = b.includes("__") ? 0 : 1;
  return ga - gb || a.localeCompare(b);
}
