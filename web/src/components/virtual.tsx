// A scrolling list that renders only the rows in view (plus a few either side), so boards of 10,000 teams and
// logs of hundreds of thousands of lines stay smooth. Rows have one fixed height.
import type { ComponentChildren, Ref, VNode } from "preact";
import { useEffect, useLayoutEffect, useRef, useState } from "preact/hooks";

export interface VirtualListProps {
  count: number;
  rowHeight: number;
  render: (i: number) => VNode;
  /** Rendered above the rows, sticky at the top of the scrolling area (a table header). */
  header?: ComponentChildren;
  overscan?: number;
  class?: string;
  testid?: string;
  /** Called on every scroll with the element, e.g. to know whether the view is at the bottom. */
  onScroll?: (el: HTMLDivElement) => void;
  outerRef?: Ref<HTMLDivElement>;
  /** The list re-renders when this changes even if `count` did not (rows changed in place). */
  version?: unknown;
  /** A CSS height for the scrolling area (else the stylesheet's). */
  height?: string;
}

export function VirtualList(p: VirtualListProps) {
  const own = useRef<HTMLDivElement>(null);
  const [view, setView] = useState({ top: 0, height: 600 });

  const measure = () => {
    const el = own.current;
    if (!el) return;
    const next = { top: el.scrollTop, height: el.clientHeight || 600 };
    setView((v) => (v.top === next.top && v.height === next.height ? v : next));
  };

  useLayoutEffect(() => {
    const el = own.current;
    if (!el) return;
    measure();
    const ro = new ResizeObserver(measure);
    ro.observe(el);
    return () => ro.disconnect();
  }, []);

  // Keep the outer ref pointing at the scrolling element.
  useEffect(() => {
    const r = p.outerRef;
    if (!r) return;
    if (typeof r === "function") r(own.current);
    else r.current = own.current;
  });

  const overscan = p.overscan ?? 8;
  const first = Math.max(0, Math.floor(view.top / p.rowHeight) - overscan);
  const last = Math.min(p.count, Math.ceil((view.top + view.height) / p.rowHeight) + overscan);
  const rows: VNode[] = [];
  for (let i = first; i < last; i++) rows.push(p.render(i));

  return (
    <div
      ref={own}
      class={`vlist ${p.class ?? ""}`}
      data-testid={p.testid}
      style={p.height ? { height: p.height } : undefined}
      onScroll={() => {
        if (p.onScroll && own.current) p.onScroll(own.current);
        measure();
      }}
    >
      {p.header}
      <div class="vlist-inner" style={{ height: `${p.count * p.rowHeight}px` }}>
        <div class="vlist-rows" style={{ transform: `translateY(${first * p.rowHeight}px)` }}>
          {rows}
        </div>
      </div>
    </div>
  );
}
