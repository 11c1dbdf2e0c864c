// The team's sessions, live: `nsml ps -a` in the browser.
import { useState } from "preact/hooks";
import { useApp } from "../app";
import { sessions } from "../api";
import { SessionKind } from "../gen/nsml/v1/common_pb";
import { SessionStatus, type ListSessionsResponse, type Session } from "../gen/nsml/v1/session_pb";
import { bytes, num, resources, summary } from "../format";
import { useLive, useNow } from "../live";
import { to } from "../router";
import { Empty, ErrorNote, Loading, PageHead, Section, SessionBadge, TimeAgo, kindText } from "../components/ui";

export function Sessions() {
  const app = useApp();
  const [dataset, setDataset] = useState("");
  const [all, setAll] = useState(true);
  const now = useNow(10_000);
  const live = useLive<ListSessionsResponse>(
    `sessions:${dataset}:${all}`,
    (signal) => sessions.watch({ all, dataset }, { signal }),
    (signal) => sessions.list({ all, dataset }, { signal }),
  );
  // Newest first.
  const list = [...(live.data?.sessions ?? [])].sort(
    (a, b) => num(b.createdAtMs) - num(a.createdAtMs) || num(b.number) - num(a.number),
  );
  const running = list.filter((s) => s.status === SessionStatus.RUNNING).length;
  const queued = list.filter((s) => s.status === SessionStatus.QUEUED).length;

  return (
    <>
      <PageHead
        title="Sessions"
        sub={
          app.team ? (
            <>
              Team <strong>{app.team}</strong> · {running} running · {queued} queued
            </>
          ) : (
            "Training and submit sessions"
          )
        }
        actions={
          <>
            <label class="check">
              <input type="checkbox" checked={all} onChange={(e) => setAll((e.target as HTMLInputElement).checked)} /> Include ended
            </label>
            <select
              aria-label="Dataset"
              value={dataset}
              onChange={(e) => setDataset((e.target as HTMLSelectElement).value)}
              data-testid="sessions-dataset"
            >
              <option value="">All datasets</option>
              {(app.comp?.datasets ?? []).map((d) => (
                <option value={d.name} key={d.name}>
                  {d.name}
                </option>
              ))}
            </select>
          </>
        }
      />
      <Section title="Sessions">
        <ErrorNote error={live.error} live={live.data !== undefined} />
        {live.loading ? (
          <Loading what="sessions" />
        ) : list.length === 0 ? (
          live.error ? null : (
            <Empty title="No sessions yet." testid="sessions-empty">
              Start one from your code's directory with <code>nsml run -d DATASET -e main.py</code>; it shows here at once and
              updates live.
            </Empty>
          )
        ) : (
          <div class="table-wrap">
            <table class="table" data-testid="sessions-table">
              <thead>
                <tr>
                  <th>Name</th>
                  <th>Created</th>
                  <th>Status</th>
                  <th>Summary</th>
                  <th>Description</th>
                  <th class="num">Models</th>
                  <th class="num">Size</th>
                  <th>Type</th>
                  <th>Resources</th>
                </tr>
              </thead>
              <tbody>
                {list.map((s) => (
                  <SessionRow s={s} now={now} key={s.name} />
                ))}
              </tbody>
            </table>
          </div>
        )}
      </Section>
    </>
  );
}

export function StatusCell(p: { s: Session }) {
  const s = p.s;
  const exit = (s.status === SessionStatus.EXITED || s.status === SessionStatus.FAILED) && s.exitCode !== 0;
  return (
    <div class="status-cell">
      <SessionBadge status={s.status} testid="session-status" />
      {s.status === SessionStatus.QUEUED && (
        <div class="reason" data-testid="session-reason">
          {s.reason || "Allocated, not created yet"}
        </div>
      )}
      {s.status !== SessionStatus.QUEUED && (s.reason || exit) && (
        <div class="reason" data-testid="session-reason">
          {s.reason}
          {exit ? `${s.reason ? " · " : ""}exit code ${s.exitCode}` : ""}
        </div>
      )}
    </div>
  );
}

export function describe(s: Session): string {
  if (s.kind === SessionKind.SUBMIT || s.kind === SessionKind.TRIAL_SUBMIT) {
    const src = s.sourceSession ? `submit of ${s.sourceSession}${s.sourceCheckpoint ? ` (checkpoint ${s.sourceCheckpoint})` : ""}` : "submit";
    return s.memo ? `${src} · ${s.memo}` : src;
  }
  return s.memo;
}

function SessionRow(p: { s: Session; now: number }) {
  const s = p.s;
  return (
    <tr data-testid="session-row" data-session={s.name}>
      <td class="nowrap">
        <a href={to.session(s.name)} class="mono strong" data-testid="session-name">
          {s.name}
        </a>
        {s.args && <div class="muted small mono ellipsis" title={`${s.entry} ${s.args}`}>{s.args}</div>}
      </td>
      <td class="nowrap">
        <TimeAgo ms={s.createdAtMs} now={p.now} />
      </td>
      <td>
        <StatusCell s={s} />
      </td>
      <td class="mono small summary" data-testid="session-summary">
        {summary(s.summaryJson) || <span class="muted">—</span>}
      </td>
      <td class="small">{describe(s) || <span class="muted">—</span>}</td>
      <td class="num">{s.checkpointCount}</td>
      <td class="num nowrap">{bytes(s.checkpointBytes)}</td>
      <td class="nowrap">{kindText(s.kind)}</td>
      <td class="small nowrap">{resources(s.resources)}</td>
    </tr>
  );
}
