// Small shared pieces: status badges, empty states, errors, page headings.
import type { ComponentChildren } from "preact";
import { SessionKind } from "../gen/nsml/v1/common_pb";
import { SessionStatus } from "../gen/nsml/v1/session_pb";
import { SubmissionStatus } from "../gen/nsml/v1/submission_pb";
import { ago, dateTime } from "../format";

export type Tone = "grey" | "blue" | "green" | "amber" | "red" | "purple";

export function Badge(p: { tone: Tone; children: ComponentChildren; testid?: string; title?: string }) {
  return (
    <span class={`badge badge-${p.tone}`} data-testid={p.testid} title={p.title}>
      {p.children}
    </span>
  );
}

const SESSION: Record<number, [string, Tone]> = {
  [SessionStatus.UNSPECIFIED]: ["Unknown", "grey"],
  [SessionStatus.QUEUED]: ["Queued", "amber"],
  [SessionStatus.RUNNING]: ["Running", "blue"],
  [SessionStatus.STOPPING]: ["Stopping", "amber"],
  [SessionStatus.EXITED]: ["Exited", "green"],
  [SessionStatus.FAILED]: ["Failed", "red"],
  [SessionStatus.STOPPED]: ["Stopped", "grey"],
};

export const sessionStatusText = (s: SessionStatus): string => (SESSION[s] ?? SESSION[0])[0];

export function SessionBadge(p: { status: SessionStatus; testid?: string }) {
  const [text, tone] = SESSION[p.status] ?? SESSION[0];
  return (
    <Badge tone={tone} testid={p.testid}>
      {text}
    </Badge>
  );
}

export const sessionEnded = (s: SessionStatus): boolean =>
  s === SessionStatus.EXITED || s === SessionStatus.FAILED || s === SessionStatus.STOPPED;

const SUBMISSION: Record<number, [string, Tone]> = {
  [SubmissionStatus.UNSPECIFIED]: ["Unknown", "grey"],
  [SubmissionStatus.RUNNING]: ["Running", "blue"],
  [SubmissionStatus.SCORING]: ["Scoring", "purple"],
  [SubmissionStatus.SCORED]: ["Scored", "green"],
  [SubmissionStatus.FAILED]: ["Failed", "red"],
  [SubmissionStatus.TIMED_OUT]: ["Timed out", "red"],
};

export function SubmissionBadge(p: { status: SubmissionStatus; testid?: string }) {
  const [text, tone] = SUBMISSION[p.status] ?? SUBMISSION[0];
  return (
    <Badge tone={tone} testid={p.testid}>
      {text}
    </Badge>
  );
}

export function kindText(k: SessionKind): string {
  switch (k) {
    case SessionKind.TRAIN:
      return "train";
    case SessionKind.TRIAL_SUBMIT:
      return "trial submit";
    case SessionKind.SUBMIT:
      return "submit";
    default:
      return "—";
  }
}

export function PageHead(p: { title: ComponentChildren; sub?: ComponentChildren; actions?: ComponentChildren }) {
  return (
    <div class="page-head">
      <div>
        <h1>{p.title}</h1>
        {p.sub && <p class="sub">{p.sub}</p>}
      </div>
      {p.actions && <div class="actions">{p.actions}</div>}
    </div>
  );
}

export function Section(p: { title: ComponentChildren; actions?: ComponentChildren; children: ComponentChildren }) {
  return (
    <section class="card">
      <div class="card-head">
        <h2>{p.title}</h2>
        {p.actions && <div class="actions">{p.actions}</div>}
      </div>
      {p.children}
    </section>
  );
}

export function Empty(p: { title: string; children?: ComponentChildren; testid?: string }) {
  return (
    <div class="empty" data-testid={p.testid ?? "empty"}>
      <strong>{p.title}</strong>
      {p.children && <p>{p.children}</p>}
    </div>
  );
}

export function ErrorNote(p: { error: string | null | undefined; live?: boolean }) {
  if (!p.error) return null;
  return (
    <div class="error" role="alert" data-testid="error">
      {p.error}
      {p.live && <span class="muted"> — reconnecting…</span>}
    </div>
  );
}

export function Loading(p: { what?: string }) {
  return <div class="loading">Loading{p.what ? ` ${p.what}` : ""}…</div>;
}

export function TimeAgo(p: { ms: bigint | number; now: number }) {
  return <time title={dateTime(p.ms)}>{ago(p.ms, p.now)}</time>;
}

export function Code(p: { children: ComponentChildren }) {
  return <code class="mono">{p.children}</code>;
}
