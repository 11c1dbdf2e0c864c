// A session's log, followed live. Lines that arrive are batched and shown once per animation frame, the list
// renders only the lines in view, and the view stays at the bottom while the reader is at the bottom.
import { useEffect, useLayoutEffect, useRef, useState } from "preact/hooks";
import { sessions } from "../api";
import type { LogLine } from "../gen/nsml/v1/session_pb";
import { clock, dateTime, num } from "../format";
import { follow, sleep, useLatest } from "../live";
import { VirtualList } from "./virtual";

interface Line {
  seq: number;
  at: number;
  stream: string;
  text: string;
}

const ROW = 19;
// Lines kept in the page; beyond it the oldest are let go (the CLI's `nsml logs` prints them all).
const KEEP = 200_000;
const DROP = 50_000;

export function LogView(p: { name: string; ended: boolean; emptyText?: string }) {
  const lines = useRef<Line[]>([]);
  const pending = useRef<Line[]>([]);
  const lastSeq = useRef(-1);
  const frame = useRef(0);
  const dropped = useRef(0);
  const outer = useRef<HTMLDivElement>(null);
  const atBottom = useRef(true);
  const [version, setVersion] = useState(0);
  const [error, setError] = useState<string | null>(null);
  const [done, setDone] = useState(false);
  const [following, setFollowing] = useState(true);
  const ended = useLatest(p.ended);

  useEffect(() => {
    lines.current = [];
    pending.current = [];
    lastSeq.current = -1;
    dropped.current = 0;
    atBottom.current = true;
    setFollowing(true);
    setDone(false);
    setError(null);
    setVersion((v) => v + 1);

    const flush = () => {
      frame.current = 0;
      const batch = pending.current;
      if (!batch.length) return;
      pending.current = [];
      const all = lines.current;
      for (let i = 0; i < batch.length; i++) all.push(batch[i]);
      if (all.length > KEEP) {
        const n = all.length - KEEP + DROP;
        all.splice(0, n);
        dropped.current += n;
      }
      setVersion((v) => v + 1);
    };

    const ac = new AbortController();
    void follow<LogLine>(
      ac.signal,
      (signal) => sessions.logs({ name: p.name, follow: true }, { signal }),
      {
        message: (l) => {
          const seq = num(l.seq);
          // A reopened stream starts from the beginning again: skip what is shown already.
          if (seq <= lastSeq.current) return;
          lastSeq.current = seq;
          pending.current.push({ seq, at: num(l.atMs), stream: l.stream, text: l.text });
          if (!frame.current) frame.current = requestAnimationFrame(flush);
        },
        error: setError,
        // A followed log ends when its session does; the session's new state may arrive a moment later. Only
        // a log that ended while its session still runs (the platform restarted) is opened again.
        reopen: async () => {
          for (let i = 0; i < 20 && !ended.current && !ac.signal.aborted; i++) await sleep(250, ac.signal);
          if (ended.current) {
            setDone(true);
            return false;
          }
          return true;
        },
      },
    ).then(() => {
      if (!ac.signal.aborted) setDone(true);
    });
    return () => {
      ac.abort();
      cancelAnimationFrame(frame.current);
      frame.current = 0;
    };
  }, [p.name]);

  // Keep the newest line in view while the reader is at the bottom.
  useLayoutEffect(() => {
    const el = outer.current;
    if (el && atBottom.current) el.scrollTop = el.scrollHeight;
  }, [version]);

  const count = lines.current.length;
  const all = lines.current;

  return (
    <div class="logview">
      <div class="log-toolbar">
        <span class="muted" data-testid="log-count">
          {count.toLocaleString()} line{count === 1 ? "" : "s"}
          {dropped.current ? ` (the first ${dropped.current.toLocaleString()} are no longer shown)` : ""}
        </span>
        <span class="log-state">
          {error ? null : done || p.ended ? (
            <span class="muted">end of log</span>
          ) : (
            <span class="live-dot">live</span>
          )}
          {!following && (
            <button
              class="btn btn-small"
              data-testid="log-follow"
              onClick={() => {
                atBottom.current = true;
                setFollowing(true);
                const el = outer.current;
                if (el) el.scrollTop = el.scrollHeight;
              }}
            >
              Jump to the end ↓
            </button>
          )}
        </span>
      </div>
      {error && (
        <div class="error" role="alert" data-testid="log-error">
          {error}
        </div>
      )}
      <VirtualList
        count={count}
        rowHeight={ROW}
        class="log-lines"
        testid="log-lines"
        outerRef={outer}
        version={version}
        overscan={20}
        height={`${Math.min(440, Math.max(160, count * ROW + 16))}px`}
        onScroll={(el) => {
          const bottom = el.scrollHeight - el.scrollTop - el.clientHeight < ROW * 2;
          atBottom.current = bottom;
          if (bottom !== following) setFollowing(bottom);
        }}
        render={(i) => {
          const l = all[i];
          return (
            <div class={`log-line log-${l.stream}`} key={l.seq} data-seq={l.seq}>
              <span class="log-time" title={dateTime(l.at)}>
                {clock(l.at)}
              </span>
              <span class="log-text">{l.text}</span>
            </div>
          );
        }}
      />
      {count === 0 && !error && (
        <div class="log-empty muted" data-testid="log-empty">
          {done || p.ended ? (p.emptyText ?? "The session printed nothing.") : "Waiting for the session's first line…"}
        </div>
      )}
    </div>
  );
}
