// The team's trial and real submits, live, with their scores, failure reasons and (for trials) logs.
import { useState } from "preact/hooks";
import { useApp } from "../app";
import { submissions } from "../api";
import { SubmissionStatus, type ListSubmissionsResponse, type Submission } from "../gen/nsml/v1/submission_pb";
import { dateTime, duration, num, score } from "../format";
import { useLive, useNow } from "../live";
import { navigate, to } from "../router";
import { Badge, Empty, ErrorNote, Loading, PageHead, Section, SubmissionBadge, TimeAgo } from "../components/ui";
import { LogView } from "../components/logview";

export function Submissions(p: { dataset: string }) {
  const app = useApp();
  const now = useNow(1000);
  const [open, setOpen] = useState<string | null>(null);
  const live = useLive<ListSubmissionsResponse>(
    `subs:${p.dataset}`,
    (signal) => submissions.watch({ dataset: p.dataset }, { signal }),
    (signal) => submissions.list({ dataset: p.dataset }, { signal }),
  );
  const list = [...(live.data?.submissions ?? [])].sort((a, b) => num(b.submittedAtMs) - num(a.submittedAtMs));
  const anyPrivate = list.some((s) => s.privateScore !== undefined);

  return (
    <>
      <PageHead
        title="Submissions"
        sub={app.team ? <>Team <strong>{app.team}</strong>: trial and real submits, newest first</> : "Trial and real submits, newest first"}
        actions={
          <select
            aria-label="Dataset"
            value={p.dataset}
            onChange={(e) => navigate(to.submissions((e.target as HTMLSelectElement).value))}
            data-testid="submissions-dataset"
          >
            <option value="">All datasets</option>
            {(app.comp?.datasets ?? []).map((d) => (
              <option value={d.name} key={d.name}>
                {d.name}
              </option>
            ))}
          </select>
        }
      />
      <Section title={p.dataset ? `Submissions of ${p.dataset}` : "All submissions"}>
        <ErrorNote error={live.error} live={live.data !== undefined} />
        {live.loading ? (
          <Loading what="submissions" />
        ) : list.length === 0 ? (
          live.error ? null : (
            <Empty title="No submissions yet." testid="submissions-empty">
              Try a checkpoint on the small trial set first with <code>nsml submit -t SESSION CHECKPOINT</code> (its logs show
              here), then submit it for real with <code>nsml submit SESSION CHECKPOINT</code>.
            </Empty>
          )
        ) : (
          <div class="table-wrap">
            <table class="table" data-testid="submissions-table">
              <thead>
                <tr>
                  <th>Submitted</th>
                  <th>Type</th>
                  <th>Model</th>
                  <th>Status</th>
                  <th class="num">Score</th>
                  {anyPrivate && <th class="num">Private</th>}
                  <th class="num">Took</th>
                  <th>Logs</th>
                </tr>
              </thead>
              <tbody>
                {list.map((s) => (
                  <SubmissionRows
                    key={s.id}
                    s={s}
                    now={now}
                    anyPrivate={anyPrivate}
                    open={open === s.id}
                    toggle={() => setOpen(open === s.id ? null : s.id)}
                  />
                ))}
              </tbody>
            </table>
          </div>
        )}
      </Section>
    </>
  );
}

function SubmissionRows(p: { s: Submission; now: number; anyPrivate: boolean; open: boolean; toggle(): void }) {
  const s = p.s;
  const inFlight = s.status === SubmissionStatus.RUNNING || s.status === SubmissionStatus.SCORING;
  const started = num(s.submittedAtMs);
  const took = (num(s.finishedAtMs) || (inFlight ? p.now : 0)) - started;
  const limit = num(s.timeLimitSecs) * 1000;
  const cols = p.anyPrivate ? 8 : 7;
  return (
    <>
      <tr data-testid="submission-row" data-submission={s.id} data-dataset={s.dataset}>
        <td class="nowrap">
          <TimeAgo ms={s.submittedAtMs} now={p.now} />
          <div class="muted small mono" title="submission id">
            {s.id}
          </div>
        </td>
        <td>{s.trial ? <Badge tone="grey">trial</Badge> : <Badge tone="blue">real</Badge>}</td>
        <td class="mono small">
          <a href={to.session(s.sourceSession)}>{s.sourceSession}</a>/{s.checkpoint}
          <div class="muted">{s.dataset}</div>
        </td>
        <td>
          <SubmissionBadge status={s.status} testid="submission-status" />
          {s.reason && (
            <div class="reason" data-testid="submission-reason">
              {s.reason}
            </div>
          )}
        </td>
        <td class="num mono" data-testid="submission-score" title={s.metric}>
          {s.status === SubmissionStatus.SCORED ? score(s.score) : "—"}
        </td>
        {p.anyPrivate && <td class="num mono">{s.privateScore !== undefined ? score(s.privateScore) : "—"}</td>}
        <td class="num nowrap" title={limit ? `time limit ${duration(limit)}` : undefined}>
          {started && took > 0 ? duration(took) : "—"}
          {inFlight && limit ? <div class="muted small">of {duration(limit)}</div> : null}
        </td>
        <td class="nowrap">
          {s.trial && s.session ? (
            <button class="btn btn-small" onClick={p.toggle} aria-expanded={p.open} data-testid="submission-logs-toggle">
              {p.open ? "Hide logs" : "Show logs"}
            </button>
          ) : s.trial ? (
            <span class="muted small">not started</span>
          ) : (
            <span class="muted small" title="The real submit runs on the hidden test set; its logs are not shown.">
              hidden
            </span>
          )}
        </td>
      </tr>
      {p.open && s.session && (
        <tr class="expand">
          <td colSpan={cols}>
            <div class="expand-head">
              Trial session <a href={to.session(s.session)} class="mono">{s.session}</a> · submitted {dateTime(s.submittedAtMs)}
            </div>
            <LogView name={s.session} ended={!inFlight} />
          </td>
        </tr>
      )}
    </>
  );
}
