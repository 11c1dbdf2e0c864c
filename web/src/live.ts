// Live views over the gateway's server-streaming calls. A stream that ends or fails is opened again after a
// short backoff; leaving the page (unmounting) aborts it. Where the gateway does not serve the streaming call
// (UNIMPLEMENTED), the view falls back to asking the unary call every few seconds.
import { Code } from "@connectrpc/connect";
import { useEffect, useRef, useState } from "preact/hooks";
import { errorText, isAbort, isCode } from "./api";

export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done);
  });
}

export interface FollowHandlers<T> {
  /** A message; `first` is true for the first message of each (re)opened stream. */
  message(m: T, first: boolean): void;
  /** The error text while the stream is down, or null once it delivers again. */
  error(text: string | null): void;
  /** Asked when the stream ended cleanly: true opens it again (the default), false stops following. */
  reopen?(): boolean | Promise<boolean>;
}

// Errors that another try will not change.
const FINAL = [Code.Unauthenticated, Code.PermissionDenied, Code.NotFound, Code.InvalidArgument];

const MIN_BACKOFF = 500;
const MAX_BACKOFF = 8000;

export async function follow<T>(
  signal: AbortSignal,
  open: (signal: AbortSignal) => AsyncIterable<T>,
  on: FollowHandlers<T>,
  poll?: (signal: AbortSignal) => Promise<T>,
  pollMs = 3000,
): Promise<void> {
  let backoff = MIN_BACKOFF;
  while (!signal.aborted) {
    const openedAt = Date.now();
    let first = true;
    try {
      for await (const m of open(signal)) {
        if (signal.aborted) return;
        on.message(m, first);
        if (first) on.error(null);
        first = false;
      }
      if (signal.aborted) return;
      if (on.reopen && !(await on.reopen())) return;
      if (signal.aborted) return;
    } catch (e) {
      if (signal.aborted || isAbort(e)) return;
      if (poll && isCode(e, Code.Unimplemented)) return pollLoop(signal, poll, on, pollMs);
      on.error(errorText(e));
      if (FINAL.some((c) => isCode(e, c))) return;
    }
    // A stream that lived a while starts over quickly; one that keeps failing backs off.
    backoff = Date.now() - openedAt > 10_000 ? MIN_BACKOFF : Math.min(backoff * 2, MAX_BACKOFF);
    await sleep(backoff, signal);
  }
}

async function pollLoop<T>(
  signal: AbortSignal,
  poll: (signal: AbortSignal) => Promise<T>,
  on: FollowHandlers<T>,
  pollMs: number,
): Promise<void> {
  while (!signal.aborted) {
    try {
      const m = await poll(signal);
      if (signal.aborted) return;
      on.message(m, true);
      on.error(null);
    } catch (e) {
      if (signal.aborted || isAbort(e)) return;
      on.error(errorText(e));
      if (FINAL.some((c) => isCode(e, c))) return;
    }
    await sleep(pollMs, signal);
  }
}

export interface Live<T> {
  data: T | undefined;
  error: string | null;
  loading: boolean;
}

/**
 * The latest message of a stream that answers in full on each change. `key` names what is followed; a new
 * key starts over, null follows nothing.
 */
// First answers asked before their page was shown (at start, beside `WhoAmI`), by the key of the live view
// that will show them.
const early = new Map<string, Promise<unknown>>();

/** Asks a live view's first answer ahead of its page: the page shows it until its own stream delivers. */
export function startEarly(key: string, answer: Promise<unknown>): void {
  answer.catch(() => undefined);
  early.set(key, answer);
}

export function useLive<T>(
  key: string | null,
  open: (signal: AbortSignal) => AsyncIterable<T>,
  poll?: (signal: AbortSignal) => Promise<T>,
): Live<T> {
  const [state, setState] = useState<Live<T>>({ data: undefined, error: null, loading: key !== null });
  useEffect(() => {
    if (key === null) {
      setState({ data: undefined, error: null, loading: false });
      return;
    }
    setState({ data: undefined, error: null, loading: true });
    const ac = new AbortController();
    let streamed = false;
    const first = early.get(key) as Promise<T> | undefined;
    early.delete(key);
    first?.then(
      (m) => {
        if (!ac.signal.aborted && !streamed) setState({ data: m, error: null, loading: false });
      },
      () => undefined,
    );
    void follow(
      ac.signal,
      open,
      {
        message: (m) => {
          streamed = true;
          setState({ data: m, error: null, loading: false });
        },
        error: (text) => setState((s) => (s.error === text && !s.loading ? s : { ...s, error: text, loading: false })),
      },
      poll,
    );
    return () => ac.abort();
  }, [key]);
  return state;
}

/** A unary call's answer, asked again when `key` changes or `reload()` is called. */
export function useCall<T>(
  key: string | null,
  call: (signal: AbortSignal) => Promise<T>,
): Live<T> & { reload(): void } {
  const [n, setN] = useState(0);
  const [state, setState] = useState<Live<T>>({ data: undefined, error: null, loading: key !== null });
  useEffect(() => {
    if (key === null) {
      setState({ data: undefined, error: null, loading: false });
      return;
    }
    setState((s) => ({ ...s, loading: true }));
    const ac = new AbortController();
    call(ac.signal).then(
      (data) => {
        if (!ac.signal.aborted) setState({ data, error: null, loading: false });
      },
      (e) => {
        if (!ac.signal.aborted && !isAbort(e)) setState((s) => ({ ...s, error: errorText(e), loading: false }));
      },
    );
    return () => ac.abort();
  }, [key, n]);
  return { ...state, reload: () => setN((x) => x + 1) };
}

/** The current time, updated every `ms`. */
export function useNow(ms = 1000): number {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now()), ms);
    return () => clearInterval(t);
  }, [ms]);
  return now;
}

/** A value that follows the latest render, for callbacks registered once. */
export function useLatest<T>(v: T): { readonly current: T } {
  const r = useRef(v);
  r.current = v;
  return r;
}
