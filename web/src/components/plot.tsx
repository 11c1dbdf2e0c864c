// One uPlot chart: x is the step, one line per session.
import { useEffect, useRef } from "preact/hooks";
import uPlot from "uplot";

export const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#4b5563"];

export interface PlotProps {
  title: string;
  labels: string[];
  data: uPlot.AlignedData;
  testid?: string;
}

const HEIGHT = 220;

export function Plot(p: PlotProps) {
  const box = useRef<HTMLDivElement>(null);
  const chart = useRef<uPlot | null>(null);
  const shape = p.labels.join("\u0000");

  // (Re)create the chart when its series change.
  useEffect(() => {
    const el = box.current;
    if (!el) return;
    const opts: uPlot.Options = {
      width: Math.max(200, el.clientWidth),
      height: HEIGHT,
      legend: { show: true, live: true },
      cursor: { drag: { x: true, y: false } },
      scales: { x: { time: false } },
      axes: [
        {
          label: "step",
          stroke: "#64748b",
          grid: { stroke: "#eef2f7" },
          ticks: { stroke: "#e2e8f0" },
          // Steps are whole numbers: no ticks between them.
          incrs: [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1e3, 2e3, 2.5e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 1e7, 1e8],
        },
        { stroke: "#64748b", grid: { stroke: "#eef2f7" }, ticks: { stroke: "#e2e8f0" }, size: 60 },
      ],
      series: [
        { label: "step" },
        ...p.labels.map((label, i) => ({
          label,
          stroke: PALETTE[i % PALETTE.length],
          width: 1.75,
          spanGaps: true,
        })),
      ],
    };
    const u = new uPlot(opts, p.data, el);
    chart.current = u;
    const ro = new ResizeObserver(() => {
      const w = Math.max(200, el.clientWidth);
      if (w !== u.width) u.setSize({ width: w, height: HEIGHT });
    });
    ro.observe(el);
    return () => {
      ro.disconnect();
      u.destroy();
      chart.current = null;
    };
  }, [shape]);

  // New points: only the data changes.
  useEffect(() => {
    chart.current?.setData(p.data);
  }, [p.data]);

  return (
    <figure class="plot" data-testid={p.testid ?? "plot"} data-metric={p.title}>
      <figcaption>{p.title}</figcaption>
      <div ref={box} class="plot-box" />
    </figure>
  );
}
