// Formatting of the API's numbers, times and JSON for people.
import { Direction } from "./gen/nsml/v1/common_pb";
import type { Resources } from "./gen/nsml/v1/common_pb";

/** int64/uint64 fields arrive as bigint. */
export const num = (v: bigint | number | undefined): number => (v === undefined ? 0 : Number(v));

export function bytes(v: bigint | number): string {
  let n = num(v);
  const units = ["B", "KB", "MB", "GB", "TB", "PB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  if (i === 0) return `${n} B`;
  return `${n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2)} ${units[i]}`;
}

export function direction(d: Direction): string {
  switch (d) {
    case Direction.DESCENDING:
      return "Descending";
    case Direction.ASCENDING:
      return "Ascending";
    default:
      return "";
  }
}

// Metric names that are abbreviations, shown in capitals (`MSE`, not `Mse`).
const ABBREVIATIONS = new Set(["mse", "rmse", "mae", "auc", "roc_auc", "f1", "map", "ndcg", "bleu", "wer", "cer"]);

/** `Accuracy · Descending`, `MSE · Ascending`, as the NSML board header read. */
export function metricLine(metric: string, d: Direction): string {
  const m = !metric
    ? "Score"
    : ABBREVIATIONS.has(metric.toLowerCase())
      ? metric.toUpperCase()
      : metric.charAt(0).toUpperCase() + metric.slice(1);
  const dir = direction(d);
  return dir ? `${m} · ${dir}` : m;
}

export function score(v: number | undefined): string {
  if (v === undefined || Number.isNaN(v)) return "—";
  if (!Number.isFinite(v)) return String(v);
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-4 || a >= 1e9)) return v.toExponential(4);
  return String(Number(v.toPrecision(7)));
}

export function dateTime(ms: bigint | number): string {
  const t = num(ms);
  if (!t) return "—";
  const d = new Date(t);
  const p = (x: number) => String(x).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

export function clock(ms: bigint | number): string {
  const d = new Date(num(ms));
  const p = (x: number) => String(x).padStart(2, "0");
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, "0")}`;
}

/** `3 minutes ago`, `in 12 seconds`. */
export function ago(ms: bigint | number, now: number): string {
  const t = num(ms);
  if (!t) return "—";
  const diff = now - t;
  const s = Math.round(Math.abs(diff) / 1000);
  let text: string;
  // A moment in the future is the server's clock running slightly ahead of the browser's.
  if (s < 5 || (diff < 0 && s < 60)) return "just now";
  if (s < 60) text = `${s} seconds`;
  else if (s < 3600) text = plural(Math.round(s / 60), "minute");
  else if (s < 86400) text = plural(Math.round(s / 3600), "hour");
  else text = plural(Math.round(s / 86400), "day");
  return diff >= 0 ? `${text} ago` : `in ${text}`;
}

function plural(n: number, unit: string): string {
  return `${n} ${unit}${n === 1 ? "" : "s"}`;
}

/** `1h 02m 05s`, `1h`, `4m 10s`, `12s`, `0.4s`: whole hours and minutes without the zeros after them. */
export function duration(ms: number): string {
  if (ms > 0 && ms < 10_000) return `${(ms / 1000).toFixed(1)}s`;
  let s = Math.max(0, Math.floor(ms / 1000));
  const h = Math.floor(s / 3600);
  s -= h * 3600;
  const m = Math.floor(s / 60);
  s -= m * 60;
  const p = (x: number) => String(x).padStart(2, "0");
  if (h) return s ? `${h}h ${p(m)}m ${p(s)}s` : m ? `${h}h ${p(m)}m` : `${h}h`;
  if (m) return s ? `${m}m ${p(s)}s` : `${m}m`;
  return `${s}s`;
}

export function resources(r: Resources | undefined): string {
  if (!r) return "—";
  const parts = [`${r.gpus} GPU`, `${r.cpus} CPU`, `${bytes(r.memoryBytes)} RAM`];
  if (num(r.shmBytes)) parts.push(`${bytes(r.shmBytes)} shm`);
  return parts.join(" · ");
}

/** Metric keys as plots name them: `train__loss` is `train/loss`. */
export const metricName = (k: string): string => k.replace(/__/g, "/");

/** Parses a JSON object of metrics; anything else gives an empty list. */
export function metricsOf(json: string): [string, unknown][] {
  if (!json) return [];
  try {
    const v: unknown = JSON.parse(json);
    if (v && typeof v === "object" && !Array.isArray(v)) return Object.entries(v as Record<string, unknown>);
  } catch {
    // not JSON: shown as nothing
  }
  return [];
}

/** `epoch=0, train/loss=2.87, val/cer=0.957`, as `ps` and `model ls` print a summary. */
export function summary(json: string): string {
  return metricsOf(json)
    .map(([k, v]) => `${metricName(k)}=${typeof v === "number" ? score(v) : JSON.stringify(v)}`)
    .join(", ");
}
