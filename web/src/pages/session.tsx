// One session: its state, live log, metric plots and checkpoints.
import { useState } from "preact/hooks";
import { useApp } from "../app";
import { errorText, sessions, storage } from "../api";
import { SessionKind } from "../gen/nsml/v1/common_pb";
import { SessionStatus, type ListSessionsResponse, type Session } from "../gen/nsml/v1/session_pb";
import { bytes, dateTime, duration, num, resources, summary } from "../format";
import { useCall, useLive, useNow } from "../live";
import { to } from "../router";
import { Empty, ErrorNote, Loading, PageHead, Section, TimeAgo, kindText, sessionEnded } from "../components/ui";
import { LogView } from "../components/logview";
import { Metrics } from "../components/metrics";
import { StatusCell, describe } from "./sessions";

export function SessionPage(p: { name: string }) {
  const dataset = p.name.split("/")[1] ?? "";
  // The team's sessions of this dataset, live; the one shown is picked from them.
  const live = useLive<ListSessionsResponse>(
    `session:${p.name}`,
    (signal) => sessions.watch({ all: true, dataset }, { signal }),
    (signal) => sessions.list({ all: true, dataset }, { signal }),
  );
  const fromList = live.data?.sessions.find((s) => s.name === p.name);
  // Not among the caller's own (a host looking at a team's session): ask for it directly.
  const direct = useCall(live.data && !fromList ? `get:${p.name}` : null, (signal) => sessions.get({ name: p.name }, { signal }));
  const s = fromList ?? direct.data;

  if (!s) {
    return (
      <>
        <PageHead title={<span class="mono">{p.name}</span>} />
        <ErrorNote error={direct.error ?? live.error} />
        {live.loading || direct.loading ? <Loading what="the session" /> : null}
        {!live.loading && !direct.loading && !direct.error && !live.error && (
          <Empty title="This session does not exist.">
            It may have been removed with <code>nsml rm</code>. See <a href={to.sessions()}>your sessions</a>.
          </Empty>
        )}
      </>
    );
  }
  return <SessionView s={s} siblings={(live.data?.sessions ?? []).map((x) => x.name)} liveError={live.error} />;
}

function SessionView(p: { s: Session; siblings: string[]; liveError: string | null }) {
  const s = p.s;
  const app = useApp();
  const now = useNow(1000);
  const ended = sessionEnded(s.status);
  const isSubmit = s.kind === SessionKind.SUBMIT || s.kind === SessionKind.TRIAL_SUBMIT;
  const [actionError, setActionError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const mine = s.team === app.team;

  const started = num(s.startedAtMs);
  const endedAt = num(s.endedAtMs);
  const runFor = started ? (endedAt || now) - started : 0;

  const stop = async () => {
    if (!confirm(`Stop ${s.name}?`)) return;
    setBusy(true);
    setActionError(null);
    try {
      await sessions.stop({ name: s.name });
    } catch (e) {
      setActionError(errorText(e));
    } finally {
      setBusy(false);
    }
  };

  return (
    <>
      <PageHead
        title={
          <>
            <a class="crumb" href={to.sessions()}>
              Sessions
            </a>{" "}
            / <span class="mono" data-testid="session-title">{s.name}</span>
          </>
        }
        sub={describe(s) || undefined}
        actions={
          mine && (s.status === SessionStatus.RUNNING || s.status === SessionStatus.QUEUED) ? (
            <button class="btn btn-danger" onClick={stop} disabled={busy} data-testid="session-stop">
              Stop
            </button>
          ) : undefined
        }
      />
      <ErrorNote error={actionError} />
      <ErrorNote error={p.liveError} live />

      <section class="card">
        <div class="facts-grid" data-testid="session-info">
          <div>
            <div class="label">Status</div>
            <StatusCell s={s} />
          </div>
          <div>
            <div class="label">Type</div>
            {kindText(s.kind)}
            {s.interactive ? " · interactive" : ""}
          </div>
          <div>
            <div class="label">Dataset</div>
            <a href={to.board(s.dataset)}>{s.dataset}</a>
          </div>
          <div>
            <div class="label">Created</div>
            <span title={dateTime(s.createdAtMs)}>
              <TimeAgo ms={s.createdAtMs} now={now} />
            </span>
          </div>
          <div>
            <div class="label">{ended ? "Ran for" : "Running for"}</div>
            {started ? duration(runFor) : <span class="muted">not started</span>}
          </div>
          <div>
            <div class="label">Resources</div>
            {resources(s.resources)}
            {s.gpuIds.length > 0 && <span class="muted"> · GPU {s.gpuIds.join(", ")}</span>}
          </div>
          <div class="wide">
            <div class="label">Command</div>
            <code class="mono">
              {s.entry || "main.py"} {s.args}
            </code>
          </div>
          <div class="wide">
            <div class="label">Summary</div>
            <span class="mono" data-testid="session-summary">
              {summary(s.summaryJson) || <span class="muted">none reported yet</span>}
            </span>
          </div>
          {isSubmit && (
            <div class="wide">
              <div class="label">Submitted</div>
              {s.sourceSession ? (
                <>
                  checkpoint <code>{s.sourceCheckpoint}</code> of <a href={to.session(s.sourceSession)}>{s.sourceSession}</a>
                </>
              ) : (
                "—"
              )}
              {s.submissionId && (
                <>
                  {" "}
                  · <a href={to.submissions(s.dataset)}>submission {s.submissionId}</a>
                </>
              )}
            </div>
          )}
          {s.memo && !isSubmit && (
            <div class="wide">
              <div class="label">Memo</div>
              {s.memo}
            </div>
          )}
        </div>
      </section>

      <Section title="Logs">
        <LogView
          name={s.name}
          ended={ended}
          emptyText={s.status === SessionStatus.QUEUED ? "The session has not started yet." : undefined}
        />
      </Section>

      {!isSubmit && (
        <Section title="Metrics">
          <Metrics name={s.name} candidates={p.siblings.filter((n) => n !== s.name)} />
        </Section>
      )}

      {!isSubmit && (
        <Section title="Checkpoints">
          <Checkpoints name={s.name} count={s.checkpointCount} now={now} />
        </Section>
      )}
    </>
  );
}

function Checkpoints(p: { name: string; count: number; now: number }) {
  // Asked again whenever the session's checkpoint count changes.
  const list = useCall(`ckpt:${p.name}:${p.count}`, (signal) => storage.listCheckpoints({ session: p.name }, { signal }));
  const rows = list.data?.checkpoints ?? [];
  if (list.loading && !list.data) return <Loading what="checkpoints" />;
  return (
    <>
      <ErrorNote error={list.error} />
      {rows.length === 0 ? (
        list.error ? null : (
          <Empty title="No checkpoints saved yet." testid="checkpoints-empty">
            The training code saves one with <code>nsml.save(epoch)</code>; submit one with{" "}
            <code>nsml submit {p.name} CHECKPOINT</code>.
          </Empty>
        )
      ) : (
        <div class="table-wrap">
          <table class="table" data-testid="checkpoints-table">
            <thead>
              <tr>
                <th>Checkpoint</th>
                <th>Last Modified</th>
                <th class="num">Elapsed</th>
                <th>Summary</th>
                <th class="num">Size</th>
              </tr>
            </thead>
            <tbody>
              {rows.map((c) => (
                <tr key={c.name} data-testid="checkpoint-row" data-checkpoint={c.name}>
                  <td class="mono strong">{c.name}</td>
                  <td class="nowrap">
                    <TimeAgo ms={c.savedAtMs} now={p.now} />
                  </td>
                  <td class="num">{duration(c.elapsedSecs * 1000)}</td>
                  <td class="mono small">{summary(c.summaryJson) || <span class="muted">—</span>}</td>
                  <td class="num nowrap">{bytes(c.sizeBytes)}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </>
  );
}
