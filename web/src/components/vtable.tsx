// A table of fixed-height rows, virtualised: only the rows in view are in the page.
import type { ComponentChildren } from "preact";
import type { Ref } from "preact";
import { VirtualList } from "./virtual";

export interface Column<T> {
  label: ComponentChildren;
  /** The CSS grid track: `4rem`, `minmax(8rem, 1fr)`. */
  track: string;
  cell: (row: T, i: number) => ComponentChildren;
  class?: string;
  testid?: string;
}

export interface VTableProps<T> {
  rows: readonly T[];
  columns: Column<T>[];
  rowKey: (row: T, i: number) => string;
  rowHeight?: number;
  rowClass?: (row: T) => string;
  rowTestid?: string;
  rowData?: (row: T) => Record<string, string>;
  testid?: string;
  label?: string;
  outerRef?: Ref<HTMLDivElement>;
  version?: unknown;
}

const HEADER = 38;

export function VTable<T>(p: VTableProps<T>) {
  const h = p.rowHeight ?? 40;
  const tpl = p.columns.map((c) => c.track).join(" ");
  const height = `min(70vh, ${p.rows.length * h + HEADER + 2}px)`;
  return (
    <div class="vtable" style={{ "--cols": tpl, height }} role="table" aria-label={p.label} aria-rowcount={p.rows.length}>
      <VirtualList
        count={p.rows.length}
        rowHeight={h}
        testid={p.testid}
        outerRef={p.outerRef}
        version={p.version}
        header={
          <div class="vrow vhead" role="row">
            {p.columns.map((c, i) => (
              <div class={`vcell ${c.class?.includes("num") ? "num" : ""}`} role="columnheader" key={i}>
                {c.label}
              </div>
            ))}
          </div>
        }
        render={(i) => {
          const row = p.rows[i];
          const data = p.rowData ? p.rowData(row) : {};
          return (
            <div
              class={`vrow ${p.rowClass ? p.rowClass(row) : ""}`}
              role="row"
              aria-rowindex={i + 1}
              key={p.rowKey(row, i)}
              data-testid={p.rowTestid}
              {...data}
            >
              {p.columns.map((c, j) => (
                <div class={`vcell ${c.class ?? ""}`} role="cell" key={j} data-testid={c.testid}>
                  {c.cell(row, i)}
                </div>
              ))}
            </div>
          );
        }}
      />
    </div>
  );
}
