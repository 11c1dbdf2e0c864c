// Hosts: competitions and teams, revealing the private board, the audit (explain, verify, replay) and
// overrides.
import { useEffect, useState } from "preact/hooks";
import { useApp } from "../app";
import { auth, errorText } from "../api";
import { quota } from "../quota-api";
import type { Competition } from "../gen/nsml/v1/auth_pb";
import { SessionKind } from "../gen/nsml/v1/common_pb";
import {
  OverrideKind,
  type Decision,
  type EventRef,
  type Explanation,
  type Override,
  type ReplayReport,
  type VerifyReport,
} from "../gen/nsml/v1/quota_pb";
import { bytes, dateTime, duration, metricLine, num, resources } from "../format";
import { useNow } from "../live";
import { navigate, to } from "../router";
import { Badge, Empty, ErrorNote, PageHead, Section, kindText } from "../components/ui";
import { OverrideItem } from "./quota";

export function HostPage(p: { explain: string }) {
  const app = useApp();
  if (!app.anyHost) {
    return (
      <>
        <PageHead title="Host" />
        <Empty title="This page is for the competition's hosts.">
          Your account hosts no competition. The overview, your sessions and the quota are in the menu above.
        </Empty>
      </>
    );
  }
  return (
    <>
      <PageHead title="Host" sub="Competitions, the private board, the audit log and overrides" />
      <Competitions />
      <Explain id={p.explain} />
      <div class="two-col">
        <Verify />
        <Replay />
      </div>
      <GrantOverride />
    </>
  );
}

function Competitions() {
  const app = useApp();
  const hosted = app.competitions.filter((c) => app.me.admin || app.me.hosts.includes(c.id) || c.hosts.includes(app.me.username));
  return (
    <Section title="Competitions">
      {hosted.length === 0 ? (
        <Empty title="No competition to host yet.">
          Register one from its manifest with <code>nsml admin competition apply FILE</code>.
        </Empty>
      ) : (
        hosted.map((c) => <CompetitionCard c={c} key={c.id} />)
      )}
    </Section>
  );
}

function CompetitionCard(p: { c: Competition }) {
  const app = useApp();
  const c = p.c;
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const reveal = async () => {
    if (!confirm(`Reveal the private leaderboard of ${c.title || c.id} to every participant? This cannot be undone.`)) return;
    setBusy(true);
    setError(null);
    try {
      await auth.revealPrivate({ competition: c.id });
      app.reloadCompetitions();
    } catch (e) {
      setError(errorText(e));
    } finally {
      setBusy(false);
    }
  };
  return (
    <div class="comp-card" data-testid="host-competition" data-competition={c.id}>
      <div class="comp-card-head">
        <div>
          <h3>
            {c.title || c.id} <span class="muted mono small">{c.id}</span>
          </h3>
          <div class="muted small">
            policy version {num(c.policyVersion)} · hosts {c.hosts.join(", ") || "—"}
          </div>
        </div>
        <div class="actions">
          {c.privateRevealed ? (
            <Badge tone="purple" testid="private-revealed">
              private board revealed
            </Badge>
          ) : (
            <button class="btn btn-danger" onClick={reveal} disabled={busy} data-testid="reveal-private">
              Reveal private board
            </button>
          )}
        </div>
      </div>
      <ErrorNote error={error} />
      <div class="comp-cols">
        <div>
          <div class="label">Datasets</div>
          <ul class="plain">
            {c.datasets.map((d) => (
              <li key={d.name}>
                <a href={to.board(d.name)}>{d.name}</a> <span class="muted">{metricLine(d.metric, d.direction)}</span>{" "}
                <a class="small" href={to.board(d.name, true)}>
                  private
                </a>
              </li>
            ))}
            {c.datasets.length === 0 && <li class="muted">none</li>}
          </ul>
        </div>
        <div>
          <div class="label">Teams ({c.teams.length})</div>
          <ul class="plain" data-testid="host-teams">
            {c.teams.map((t) => (
              <li key={t.name}>
                <strong>{t.name}</strong> <span class="muted">{t.members.join(", ")}</span>
              </li>
            ))}
            {c.teams.length === 0 && <li class="muted">none yet</li>}
          </ul>
        </div>
        {c.policy && (
          <div>
            <div class="label">Policy per team</div>
            <div class="small">
              {c.policy.teamGpus} GPUs · {c.policy.teamCpus} CPUs · {bytes(c.policy.teamMemoryBytes)} · {c.policy.teamSessions}{" "}
              sessions · {bytes(c.policy.teamStorageBytes)} storage
              <br />
              submit every {duration(num(c.policy.submitIntervalSecs) * 1000)}, within{" "}
              {duration(num(c.policy.submitTimeLimitSecs) * 1000)}, ≤ {c.policy.submitMaxCpus} CPUs
            </div>
          </div>
        )}
      </div>
    </div>
  );
}

function Explain(p: { id: string }) {
  const [input, setInput] = useState(p.id);
  const [result, setResult] = useState<Explanation | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  useEffect(() => {
    setInput(p.id);
    setResult(null);
    setError(null);
    if (!p.id) return;
    const ac = new AbortController();
    setBusy(true);
    quota.explain({ id: p.id }, { signal: ac.signal }).then(
      (r) => {
        setResult(r);
        setBusy(false);
      },
      (e) => {
        if (ac.signal.aborted) return;
        setError(errorText(e));
        setBusy(false);
      },
    );
    return () => ac.abort();
  }, [p.id]);

  return (
    <Section title="Audit: explain a decision">
      <form
        class="inline-form"
        onSubmit={(e) => {
          e.preventDefault();
          const id = input.trim();
          if (id) navigate(to.explain(id));
        }}
      >
        <input
          class="grow"
          placeholder="A session (TEAM/DATASET/N), a submission id or a decision id"
          value={input}
          onInput={(e) => setInput((e.target as HTMLInputElement).value)}
          data-testid="explain-input"
        />
        <button class="btn btn-primary" type="submit" disabled={busy} data-testid="explain-submit">
          {busy ? "Explaining…" : "Explain"}
        </button>
      </form>
      <ErrorNote error={error} />
      {result && <ExplanationView x={result} />}
      {!result && !error && !busy && (
        <p class="hint">Shows the state the admission decision saw, the rule that fired, and the ledger events it rests on.</p>
      )}
    </Section>
  );
}

function DecisionLine(p: { d: Decision | undefined; testid?: string }) {
  const d = p.d;
  if (!d) return <span class="muted">—</span>;
  return (
    <span data-testid={p.testid}>
      {d.granted ? <Badge tone="green">granted</Badge> : <Badge tone="red">refused</Badge>}{" "}
      {d.rule && <code>{d.rule}</code>} {d.reason}
      {num(d.retryAfterMs) ? <span class="muted"> · retry after {duration(num(d.retryAfterMs))}</span> : null}
      {d.overrides.length > 0 && <span class="muted"> · overrides honoured: {d.overrides.join(", ")}</span>}
    </span>
  );
}

function ExplanationView(p: { x: Explanation }) {
  const x = p.x;
  const now = useNow(30_000);
  const r = x.request;
  const d = x.decision;
  return (
    <div class="explain" data-testid="explain-result">
      <dl class="facts">
        <dt>Decision</dt>
        <dd>
          <DecisionLine d={d} testid="explain-decision" />
        </dd>
        <dt>Rule that fired</dt>
        <dd>
          <code data-testid="explain-rule">{x.rule || "—"}</code>
        </dd>
        <dt>Decided</dt>
        <dd>
          {d ? dateTime(d.decidedAtMs) : "—"} <span class="muted mono small">{d?.id}</span>
          {d && (
            <span class="muted small">
              {" "}
              · policy v{num(d.policyVersion)} · ledger v{num(d.ledgerVersion)}
            </span>
          )}
        </dd>
        <dt>Replayed now</dt>
        <dd data-testid="explain-replay">
          {x.replayMatches ? (
            <Badge tone="green">matches the record</Badge>
          ) : (
            <>
              <Badge tone="red">differs from the record</Badge> <DecisionLine d={x.replayed} />
              {x.differences.length > 0 && (
                <ul class="plain">
                  {x.differences.map((t, i) => (
                    <li key={i} class="mono small">
                      {t}
                    </li>
                  ))}
                </ul>
              )}
            </>
          )}
        </dd>
        <dt>Request</dt>
        <dd>
          {r ? (
            <>
              {kindText(r.kind)} of team <strong>{x.team || r.team}</strong>
              {r.session && (
                <>
                  {" "}
                  · session{" "}
                  <a class="mono" href={to.session(r.session)}>
                    {r.session}
                  </a>
                </>
              )}
              {r.dataset && <> · dataset {r.dataset}</>}
              {r.submissionId && (
                <>
                  {" "}
                  · submission <span class="mono">{r.submissionId}</span>
                </>
              )}
              <div class="muted small">{resources(r.resources)}</div>
            </>
          ) : (
            "—"
          )}
        </dd>
        <dt>Policy seen</dt>
        <dd>
          {x.policy ? (
            <>
              v{num(x.policyVersion)}: {x.policy.teamGpus} GPUs · {x.policy.teamCpus} CPUs · {bytes(x.policy.teamMemoryBytes)} ·{" "}
              {x.policy.teamSessions} sessions · submit every {duration(num(x.policy.submitIntervalSecs) * 1000)}
            </>
          ) : (
            "—"
          )}
        </dd>
        <dt>Held then</dt>
        <dd>
          {resources(x.heldTotal)}
          {x.held.length > 0 && (
            <table class="table compact">
              <tbody>
                {x.held.map((h, i) => (
                  <tr key={i}>
                    <td class="mono">{h.session}</td>
                    <td>{kindText(h.kind)}</td>
                    <td class="small">{resources(h.resources)}</td>
                    <td class="muted small">{h.grantedBy ? `granted at #${num(h.grantedBy.position)}` : ""}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          )}
        </dd>
        {r && (r.kind === SessionKind.SUBMIT || num(x.lastSuccessMs) > 0 || x.inFlightSubmissions.length > 0) && (
          <>
            <dt>Real submits then</dt>
            <dd>
              last success {num(x.lastSuccessMs) ? dateTime(x.lastSuccessMs) : "none"}
              {x.lastSuccessSubmissionId && <span class="mono small"> ({x.lastSuccessSubmissionId})</span>}
              {x.inFlightSubmissions.length > 0 && <> · in flight: {x.inFlightSubmissions.join(", ")}</>}
            </dd>
          </>
        )}
        {x.overrides.length > 0 && (
          <>
            <dt>Overrides</dt>
            <dd>
              <ul class="list">
                {x.overrides.map((o) => (
                  <OverrideItem o={o} now={now} key={o.id} />
                ))}
              </ul>
            </dd>
          </>
        )}
        {x.otherDecisions.length > 0 && (
          <>
            <dt>Other decisions</dt>
            <dd>
              {x.otherDecisions.map((id) => (
                <a key={id} class="mono small link-gap" href={to.explain(id)}>
                  {id}
                </a>
              ))}
            </dd>
          </>
        )}
      </dl>
      <h3 class="sub-head">Rests on</h3>
      <EventTable events={[...(x.event ? [x.event] : []), ...x.restsOn]} decision={x.event} />
    </div>
  );
}

function EventTable(p: { events: EventRef[]; decision?: EventRef }) {
  if (p.events.length === 0) return <p class="muted">No ledger events.</p>;
  return (
    <div class="table-wrap">
      <table class="table compact" data-testid="explain-events">
        <thead>
          <tr>
            <th class="num">Position</th>
            <th class="num">Version</th>
            <th>Event</th>
            <th>Recorded</th>
            <th>What it establishes</th>
          </tr>
        </thead>
        <tbody>
          {p.events.map((e, i) => (
            <tr key={i} class={e === p.decision ? "mine" : ""}>
              <td class="num mono">{num(e.position)}</td>
              <td class="num mono">{num(e.version)}</td>
              <td class="mono small">{e.eventType}</td>
              <td class="nowrap small">{dateTime(e.recordedAtMs)}</td>
              <td class="small">{e === p.decision ? <strong>the decision itself</strong> : e.note}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

function Verify() {
  const [report, setReport] = useState<VerifyReport | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const run = async () => {
    setBusy(true);
    setError(null);
    try {
      setReport(await quota.verify({}));
    } catch (e) {
      setError(errorText(e));
    } finally {
      setBusy(false);
    }
  };
  return (
    <Section
      title="Audit: verify the log"
      actions={
        <button class="btn" onClick={run} disabled={busy} data-testid="verify-run">
          {busy ? "Verifying…" : "Verify"}
        </button>
      }
    >
      <p class="hint">Checks the hash chain of the whole event log and names the first edited, deleted, inserted or reordered event.</p>
      <ErrorNote error={error} />
      {report && (
        <div data-testid="verify-result" data-intact={String(report.intact)}>
          {report.intact ? (
            <p>
              <Badge tone="green">intact</Badge> {num(report.events).toLocaleString()} events checked; the chain is unbroken.
            </p>
          ) : (
            <>
              <p>
                <Badge tone="red">broken</Badge> <strong>{report.kind}</strong> at position {num(report.position)}
              </p>
              <dl class="facts">
                <dt>Stream</dt>
                <dd class="mono">
                  {report.stream} v{num(report.version)}
                </dd>
                <dt>Event</dt>
                <dd class="mono">{report.eventId}</dd>
                <dt>Detail</dt>
                <dd>{report.message}</dd>
                <dt>Checked</dt>
                <dd>{num(report.events).toLocaleString()} events</dd>
              </dl>
            </>
          )}
        </div>
      )}
    </Section>
  );
}

function Replay() {
  const app = useApp();
  const [report, setReport] = useState<ReplayReport | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const run = async () => {
    setBusy(true);
    setError(null);
    try {
      setReport(await quota.replay({ competition: app.comp?.id ?? "" }));
    } catch (e) {
      setError(errorText(e));
    } finally {
      setBusy(false);
    }
  };
  return (
    <Section
      title="Audit: replay decisions"
      actions={
        <button class="btn" onClick={run} disabled={busy} data-testid="replay-run">
          {busy ? "Replaying…" : "Replay"}
        </button>
      }
    >
      <p class="hint">Re-derives every admission decision of {app.comp?.title || "the competition"} from the teams' ledgers alone.</p>
      <ErrorNote error={error} />
      {report && (
        <div data-testid="replay-result">
          <p>
            {report.mismatches.length === 0 ? <Badge tone="green">all match</Badge> : <Badge tone="red">{report.mismatches.length} mismatches</Badge>}{" "}
            {num(report.matched).toLocaleString()} of {num(report.decisions).toLocaleString()} decisions matched over{" "}
            {num(report.ledgers)} ledgers ({num(report.events).toLocaleString()} events) in {(num(report.elapsedMicros) / 1000).toFixed(1)} ms.
          </p>
          {report.mismatches.length > 0 && (
            <ul class="list">
              {report.mismatches.map((m, i) => (
                <li key={i}>
                  <a class="mono" href={to.explain(m.decisionId)}>
                    {m.decisionId}
                  </a>{" "}
                  team {m.team} {m.session || m.submissionId}
                  <div class="mono small">{m.differences.join("; ")}</div>
                </li>
              ))}
            </ul>
          )}
        </div>
      )}
    </Section>
  );
}

function GrantOverride() {
  const app = useApp();
  const teams = app.comp?.teams.map((t) => t.name) ?? [];
  const datasets = app.comp?.datasets.map((d) => d.name) ?? [];
  const [kind, setKind] = useState<OverrideKind>(OverrideKind.EXTRA_SUBMIT);
  const [team, setTeam] = useState("");
  const [dataset, setDataset] = useState("");
  const [submission, setSubmission] = useState("");
  const [gpus, setGpus] = useState("");
  const [cpus, setCpus] = useState("");
  const [memory, setMemory] = useState("");
  const [sessionsN, setSessionsN] = useState("");
  const [until, setUntil] = useState("");
  const [reason, setReason] = useState("");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const [done, setDone] = useState<Override | null>(null);
  const now = useNow(30_000);

  const submit = async (e: Event) => {
    e.preventDefault();
    setError(null);
    setDone(null);
    if (!reason.trim()) {
      setError("Give the reason: it is recorded with the override for everyone who audits it later.");
      return;
    }
    const untilMs = until ? new Date(until).getTime() : 0;
    if (kind === OverrideKind.RAISE_QUOTA && !(untilMs > Date.now())) {
      setError("A raised quota needs a time in the future until which it holds.");
      return;
    }
    setBusy(true);
    try {
      const o = await quota.grantOverride({
        competition: app.comp?.id ?? "",
        team: team || teams[0] || "",
        kind,
        dataset: kind === OverrideKind.RAISE_QUOTA ? "" : dataset || (kind === OverrideKind.EXTRA_SUBMIT ? datasets[0] || "" : ""),
        submissionId: kind === OverrideKind.RAISE_QUOTA ? "" : submission.trim(),
        raise:
          kind === OverrideKind.RAISE_QUOTA
            ? {
                gpus: toInt(gpus),
                cpus: toInt(cpus),
                memoryBytes: BigInt(Math.round(toFloat(memory) * 1024 ** 3)),
                sessions: toInt(sessionsN),
              }
            : undefined,
        untilMs: kind === OverrideKind.RAISE_QUOTA ? BigInt(untilMs) : 0n,
        reason: reason.trim(),
        commandId: commandId(),
      });
      setDone(o);
      setReason("");
    } catch (err) {
      setError(errorText(err));
    } finally {
      setBusy(false);
    }
  };

  return (
    <Section title="Grant an override">
      <form class="form-grid" onSubmit={submit} data-testid="override-form">
        <label class="field">
          <span>Kind</span>
          <select value={String(kind)} onChange={(e) => setKind(Number((e.target as HTMLSelectElement).value))} data-testid="override-kind">
            <option value={String(OverrideKind.EXTRA_SUBMIT)}>Extra real submit</option>
            <option value={String(OverrideKind.RAISE_QUOTA)}>Raise the quota for a while</option>
            <option value={String(OverrideKind.REOPEN_SUBMIT)}>Re-open a real submit's slot</option>
          </select>
        </label>
        <label class="field">
          <span>Team</span>
          <select value={team || teams[0] || ""} onChange={(e) => setTeam((e.target as HTMLSelectElement).value)} data-testid="override-team">
            {teams.map((t) => (
              <option value={t} key={t}>
                {t}
              </option>
            ))}
          </select>
        </label>
        {kind !== OverrideKind.RAISE_QUOTA && (
          <label class="field">
            <span>Dataset{kind === OverrideKind.REOPEN_SUBMIT ? " (optional)" : ""}</span>
            <select
              value={dataset || (kind === OverrideKind.EXTRA_SUBMIT ? datasets[0] || "" : "")}
              onChange={(e) => setDataset((e.target as HTMLSelectElement).value)}
              data-testid="override-dataset"
            >
              {kind === OverrideKind.REOPEN_SUBMIT && <option value="">the submission's</option>}
              {datasets.map((d) => (
                <option value={d} key={d}>
                  {d}
                </option>
              ))}
            </select>
          </label>
        )}
        {kind !== OverrideKind.RAISE_QUOTA && (
          <label class="field">
            <span>Submission id{kind === OverrideKind.EXTRA_SUBMIT ? " (optional: a failed submit whose slot it re-opens)" : ""}</span>
            <input
              value={submission}
              onInput={(e) => setSubmission((e.target as HTMLInputElement).value)}
              required={kind === OverrideKind.REOPEN_SUBMIT}
              data-testid="override-submission"
            />
          </label>
        )}
        {kind === OverrideKind.RAISE_QUOTA && (
          <>
            <label class="field">
              <span>GPUs</span>
              <input inputMode="numeric" value={gpus} onInput={(e) => setGpus((e.target as HTMLInputElement).value)} placeholder="unchanged" />
            </label>
            <label class="field">
              <span>CPUs</span>
              <input inputMode="numeric" value={cpus} onInput={(e) => setCpus((e.target as HTMLInputElement).value)} placeholder="unchanged" />
            </label>
            <label class="field">
              <span>Memory (GB)</span>
              <input inputMode="decimal" value={memory} onInput={(e) => setMemory((e.target as HTMLInputElement).value)} placeholder="unchanged" />
            </label>
            <label class="field">
              <span>Sessions</span>
              <input inputMode="numeric" value={sessionsN} onInput={(e) => setSessionsN((e.target as HTMLInputElement).value)} placeholder="unchanged" />
            </label>
            <label class="field">
              <span>Until</span>
              <input type="datetime-local" value={until} onInput={(e) => setUntil((e.target as HTMLInputElement).value)} data-testid="override-until" />
            </label>
          </>
        )}
        <label class="field span-all">
          <span>Reason (recorded in the team's ledger)</span>
          <input
            value={reason}
            onInput={(e) => setReason((e.target as HTMLInputElement).value)}
            placeholder="e.g. the submit failed because a scoring node was lost"
            required
            data-testid="override-reason"
          />
        </label>
        <div class="span-all">
          <button class="btn btn-primary" type="submit" disabled={busy || teams.length === 0} data-testid="override-submit">
            {busy ? "Granting…" : "Grant override"}
          </button>
        </div>
      </form>
      <ErrorNote error={error} />
      {done && (
        <div class="success" data-testid="override-result">
          Granted: <ul class="list"><OverrideItem o={done} now={now} /></ul>
        </div>
      )}
    </Section>
  );
}

function toInt(s: string): number {
  const n = parseInt(s, 10);
  return Number.isFinite(n) && n > 0 ? n : 0;
}

function toFloat(s: string): number {
  const n = parseFloat(s);
  return Number.isFinite(n) && n > 0 ? n : 0;
}

// An idempotency key (crypto.randomUUID needs a secure context; getRandomValues does not).
function commandId(): string {
  const b = crypto.getRandomValues(new Uint8Array(16));
  return "web-" + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}
