// The team's quota, live: usage against every limit, which sessions hold what, and per dataset when the next
// real submit is allowed and why, counting down each second.
import { useMemo, useState } from "preact/hooks";
import { useApp } from "../app";
import { quota } from "../quota-api";
import { OverrideKind, type DatasetSubmitState, type Override, type QuotaUsage } from "../gen/nsml/v1/quota_pb";
import type { Policy, Round } from "../gen/nsml/v1/auth_pb";
import { bytes, dateTime, duration, num } from "../format";
import { useLive, useNow } from "../live";
import { to } from "../router";
import { Badge, Empty, ErrorNote, Loading, PageHead, Section, TimeAgo, kindText, type Tone } from "../components/ui";

export function QuotaPage() {
  const app = useApp();
  const teams = app.comp?.teams.map((t) => t.name) ?? [];
  const [picked, setPicked] = useState("");
  const team = app.team || picked || (app.host ? (teams[0] ?? "") : "");
  const comp = app.comp?.id ?? "";

  const live = useLive<QuotaUsage>(
    `quota:${team}:${comp}`,
    (signal) => quota.watchUsage({ team, competition: comp }, { signal }),
    (signal) => quota.usage({ team, competition: comp }, { signal }),
  );
  const u = live.data;

  return (
    <>
      <PageHead
        title="Quota"
        sub={team ? <>Team <strong>{team}</strong>{app.comp ? ` · ${app.comp.title || app.comp.id}` : ""}</> : undefined}
        actions={
          !app.team && app.host && teams.length > 0 ? (
            <select
              aria-label="Team"
              value={team}
              onChange={(e) => setPicked((e.target as HTMLSelectElement).value)}
              data-testid="quota-team"
            >
              {teams.map((t) => (
                <option value={t} key={t}>
                  {t}
                </option>
              ))}
            </select>
          ) : undefined
        }
      />
      <ErrorNote error={live.error} live={u !== undefined} />
      {live.loading ? <Loading what="the quota" /> : u ? <Usage u={u} /> : null}
    </>
  );
}

function Usage(p: { u: QuotaUsage }) {
  const u = p.u;
  const now = useNow(1000);
  // The server's clock, so a countdown does not depend on the browser's.
  const skew = useMemo(() => (num(u.nowMs) ? num(u.nowMs) - Date.now() : 0), [u]);
  const serverNow = now + skew;
  const held = u.held;
  const pol = u.policy;

  return (
    <>
      <Section title="Usage">
        <div class="meters" data-testid="quota-usage">
          <Meter label="GPUs" used={held?.gpus ?? 0} limit={u.limitGpus} base={pol?.teamGpus} fmt={String} />
          <Meter label="CPUs" used={held?.cpus ?? 0} limit={u.limitCpus} base={pol?.teamCpus} fmt={String} />
          <Meter
            label="Memory (incl. shm)"
            used={num(held?.memoryBytes) + num(held?.shmBytes)}
            limit={num(u.limitMemoryBytes)}
            base={pol ? num(pol.teamMemoryBytes) : undefined}
            fmt={bytes}
          />
          <Meter label="Sessions" used={u.sessions} limit={u.limitSessions} base={pol?.teamSessions} fmt={String} />
          {u.storageKnown ? (
            <Meter label="Checkpoint storage" used={num(u.storageUsedBytes)} limit={num(u.limitStorageBytes)} fmt={bytes} />
          ) : (
            <div class="meter">
              <div class="meter-head">
                <span>Checkpoint storage</span>
                <span class="muted">unknown right now (limit {bytes(u.limitStorageBytes)})</span>
              </div>
            </div>
          )}
        </div>
        <p class="hint">
          A submit runs on the team's own quota: as many GPUs as its training session had, at most {u.submitMaxCpus} CPUs, and it
          must finish within {duration(num(u.submitTimeLimitSecs) * 1000)}.
        </p>
      </Section>

      <Schedule pol={pol} overrides={u.overrides} now={serverNow} />

      <Section title="Held by">
        {u.holdings.length === 0 ? (
          <Empty title="Nothing is held." testid="holdings-empty">
            No session of the team holds resources now; the whole quota is free for <code>nsml run</code> or a submit.
          </Empty>
        ) : (
          <div class="table-wrap">
            <table class="table" data-testid="holdings-table">
              <thead>
                <tr>
                  <th>Session</th>
                  <th>Type</th>
                  <th class="num">GPUs</th>
                  <th class="num">CPUs</th>
                  <th class="num">Memory</th>
                  <th class="num">shm</th>
                </tr>
              </thead>
              <tbody>
                {u.holdings.map((h) => (
                  <tr key={h.session} data-testid="holding-row" data-session={h.session}>
                    <td>
                      <a class="mono" href={to.session(h.session)}>
                        {h.session}
                      </a>
                    </td>
                    <td>{kindText(h.kind)}</td>
                    <td class="num">{h.resources?.gpus ?? 0}</td>
                    <td class="num">{h.resources?.cpus ?? 0}</td>
                    <td class="num">{bytes(h.resources?.memoryBytes ?? 0)}</td>
                    <td class="num">{bytes(h.resources?.shmBytes ?? 0)}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        )}
      </Section>

      <Section title="Real submits">
        <p class="hint">
          One real submit per dataset every {duration(num(u.submitIntervalSecs) * 1000)} (or its round's interval), counted from the
          last successful one. A failed or timed-out submit does not start the wait.
        </p>
        {u.submits.length === 0 ? (
          <Empty title="No datasets to submit to." testid="submits-empty">
            The competition's datasets show here with when the next real submit is allowed.
          </Empty>
        ) : (
          <div class="table-wrap">
            <table class="table" data-testid="submits-table">
              <thead>
                <tr>
                  <th>Dataset</th>
                  <th>Next real submit</th>
                  <th>Last success</th>
                  <th>In flight</th>
                  <th class="num">Extra</th>
                  <th>Why</th>
                </tr>
              </thead>
              <tbody>
                {u.submits.map((d) => (
                  <SubmitRow d={d} serverNow={serverNow} key={d.dataset} />
                ))}
              </tbody>
            </table>
          </div>
        )}
      </Section>

      {u.overrides.length > 0 && (
        <Section title="Host overrides in force">
          <ul class="list" data-testid="overrides">
            {u.overrides.map((o) => (
              <OverrideItem o={o} now={serverNow} key={o.id} />
            ))}
          </ul>
        </Section>
      )}
    </>
  );
}

function SubmitRow(p: { d: DatasetSubmitState; serverNow: number }) {
  const d = p.d;
  const next = num(d.nextAllowedMs);
  const wait = next - p.serverNow;
  let cell;
  if (d.closed) cell = <Badge tone="red">never: closed</Badge>;
  else if (d.notOpen)
    cell = (
      <span title={dateTime(next)}>
        <Badge tone="amber">when it opens, in {duration(wait)}</Badge>
        <div class="muted small">at {dateTime(next)}</div>
      </span>
    );
  else if (d.inFlight) cell = <Badge tone="blue">after the one in flight</Badge>;
  else if (!next || wait <= 0) cell = <Badge tone="green">now</Badge>;
  else if (d.extraSubmits > 0)
    cell = (
      <span title={`without the extra submit: ${dateTime(next)}`}>
        <Badge tone="green">now</Badge>
        <div class="muted small">
          with an extra submit a host granted; else in {duration(wait)}
        </div>
      </span>
    );
  else
    cell = (
      <span title={dateTime(next)}>
        <Badge tone="amber">in {duration(wait)}</Badge>
        <div class="muted small">at {dateTime(next)}</div>
      </span>
    );
  return (
    <tr data-testid="submit-row" data-dataset={d.dataset}>
      <td class="strong">
        <a href={to.board(d.dataset)}>{d.dataset}</a>
      </td>
      <td class="nowrap" data-testid="quota-next-submit" data-next-ms={String(next)}>
        {cell}
      </td>
      <td class="nowrap">
        {num(d.lastSuccessMs) ? (
          <>
            <TimeAgo ms={d.lastSuccessMs} now={p.serverNow} />
            {d.lastSuccessSubmissionId && <div class="muted small mono">{d.lastSuccessSubmissionId}</div>}
          </>
        ) : (
          <span class="muted">none yet</span>
        )}
      </td>
      <td class="mono small">{d.inFlight ? d.inFlightSubmissionId || "yes" : <span class="muted">—</span>}</td>
      <td class="num">{d.extraSubmits || <span class="muted">0</span>}</td>
      <td class="small" data-testid="quota-why">
        {d.why}
        {d.reopenedSubmissionIds.length > 0 && (
          <div class="muted">re-opened by a host: {d.reopenedSubmissionIds.join(", ")}</div>
        )}
      </td>
    </tr>
  );
}

/** Where a window stands at `now`: before it opens, open, or closed (at the team's own deadline when extended). */
function windowState(opens: number, deadline: number, now: number): ["upcoming" | "open" | "closed", Tone] {
  if (opens && now < opens) return ["upcoming", "amber"];
  if (deadline && now >= deadline) return ["closed", "red"];
  return ["open", "green"];
}

/** The team's extension of the deadline named `round` ("" for the competition's), if one is in force. */
function extension(overrides: Override[], round: string): Override | undefined {
  return overrides.find((o) => o.kind === OverrideKind.EXTEND_DEADLINE && o.round === round);
}

/** The competition's schedule and its rounds, each with its dates, its state for the team and its submit rules. */
function Schedule(p: { pol: Policy | undefined; overrides: Override[]; now: number }) {
  const pol = p.pol;
  if (!pol || (!num(pol.opensAtMs) && !num(pol.closesAtMs) && pol.rounds.length === 0)) return null;
  const own = extension(p.overrides, "");
  const closes = Math.max(num(pol.closesAtMs), own ? num(own.untilMs) : 0);
  const [state, tone] = windowState(num(pol.opensAtMs), num(pol.closesAtMs) ? closes : 0, p.now);
  return (
    <Section title="Schedule">
      <p class="hint" data-testid="schedule-competition">
        The competition <Badge tone={tone}>{state}</Badge>
        {num(pol.opensAtMs) ? <> · opens {dateTime(pol.opensAtMs)}</> : null}
        {num(pol.closesAtMs) ? <> · closes {dateTime(pol.closesAtMs)}</> : <> · no closing time</>}
        {own && num(pol.closesAtMs) ? <> · extended for the team to {dateTime(own.untilMs)}</> : null}
      </p>
      <p class="hint">
        A submit admitted before its deadline is scored and counts even when it finishes after it; from the deadline
        the boards show what they showed then, and that is the final ranking.
      </p>
      {pol.rounds.length > 0 && (
        <div class="table-wrap">
          <table class="table" data-testid="rounds-table">
            <thead>
              <tr>
                <th>Round</th>
                <th>Datasets</th>
                <th>Opens</th>
                <th>Closes</th>
                <th>State</th>
                <th>Submit rules</th>
              </tr>
            </thead>
            <tbody>
              {pol.rounds.map((r) => (
                <RoundRow r={r} pol={pol} overrides={p.overrides} now={p.now} key={r.name} />
              ))}
            </tbody>
          </table>
        </div>
      )}
    </Section>
  );
}

function RoundRow(p: { r: Round; pol: Policy; overrides: Override[]; now: number }) {
  const r = p.r;
  const opens = num(r.opensAtMs) || num(p.pol.opensAtMs);
  const closes = num(r.closesAtMs) || num(p.pol.closesAtMs);
  // A round without a closing time of its own closes with the competition, and moves with its extension.
  const ext = extension(p.overrides, r.name) ?? (num(r.closesAtMs) ? undefined : extension(p.overrides, ""));
  const deadline = closes ? Math.max(closes, ext ? num(ext.untilMs) : 0) : 0;
  const [state, tone] = windowState(opens, deadline, p.now);
  const interval = r.submitIntervalSecs ?? p.pol.submitIntervalSecs;
  const limit = r.submitTimeLimitSecs ?? p.pol.submitTimeLimitSecs;
  const cpus = r.submitMaxCpus ?? p.pol.submitMaxCpus;
  return (
    <tr data-testid="round-row" data-round={r.name} data-state={state}>
      <td class="strong">{r.name}</td>
      <td>
        {r.datasets.map((d, i) => (
          <span key={d}>
            {i > 0 && ", "}
            <a href={to.board(d)}>{d}</a>
          </span>
        ))}
      </td>
      <td class="nowrap">{opens ? dateTime(opens) : <span class="muted">with the competition</span>}</td>
      <td class="nowrap">
        {closes ? dateTime(closes) : <span class="muted">no closing time</span>}
        {ext && closes ? (
          <div class="muted small" data-testid="round-extended">
            extended for the team to {dateTime(ext.untilMs)}
          </div>
        ) : null}
      </td>
      <td>
        <Badge tone={tone}>{state}</Badge>
      </td>
      <td class="small">
        one every {duration(num(interval) * 1000)}, within {duration(num(limit) * 1000)}, at most {cpus} CPUs
      </td>
    </tr>
  );
}

export function overrideKind(k: OverrideKind): string {
  switch (k) {
    case OverrideKind.EXTRA_SUBMIT:
      return "extra submit";
    case OverrideKind.RAISE_QUOTA:
      return "raised quota";
    case OverrideKind.REOPEN_SUBMIT:
      return "re-opened submit";
    case OverrideKind.EXTEND_DEADLINE:
      return "extended deadline";
    default:
      return "override";
  }
}

export function OverrideItem(p: { o: Override; now: number }) {
  const o = p.o;
  return (
    <li data-testid="override">
      <Badge tone="purple">{overrideKind(o.kind)}</Badge> {o.description || o.dataset}
      {num(o.untilMs) ? <span class="muted"> · until {dateTime(o.untilMs)}</span> : null}
      <div class="muted small">
        “{o.reason}” — {o.grantedBy}, <TimeAgo ms={o.grantedAtMs} now={p.now} />
        {o.usedBy && <> · used by {o.usedBy}</>}
      </div>
    </li>
  );
}

function Meter(p: { label: string; used: number; limit: number; base?: number; fmt: (n: number) => string }) {
  const frac = p.limit > 0 ? Math.min(1, p.used / p.limit) : p.used > 0 ? 1 : 0;
  const tone = frac >= 1 ? "red" : frac >= 0.75 ? "amber" : "green";
  const raised = p.base !== undefined && p.base !== p.limit;
  return (
    <div class="meter" data-testid="quota-meter" data-label={p.label}>
      <div class="meter-head">
        <span>{p.label}</span>
        <span>
          <strong>{p.fmt(p.used)}</strong>
          <span class="muted"> of {p.fmt(p.limit)}</span>
          {raised && <span class="muted small"> (raised from {p.fmt(p.base!)})</span>}
        </span>
      </div>
      <div class="bar" role="meter" aria-valuemin={0} aria-valuemax={p.limit} aria-valuenow={p.used} aria-label={p.label}>
        <div class={`bar-fill bar-${tone}`} style={{ width: `${(frac * 100).toFixed(1)}%` }} />
      </div>
    </div>
  );
}
