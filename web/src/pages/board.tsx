// A dataset's leaderboard, live: each team's best score, with the public/private switch.
import { useRef } from "preact/hooks";
import { useApp } from "../app";
import { boards } from "../api";
import type { BoardResponse, BoardRow } from "../gen/nsml/v1/leaderboard_pb";
import type { Competition } from "../gen/nsml/v1/auth_pb";
import { dateTime, metricLine, score } from "../format";
import { useLive, useNow } from "../live";
import { navigate, to } from "../router";
import { Badge, Empty, ErrorNote, Loading, PageHead, Section, TimeAgo } from "../components/ui";
import { PrivateSwitch } from "../components/switch";
import { VTable, type Column } from "../components/vtable";

const ROW = 40;

/** The key of a board's live view (see `startEarly`). */
export function boardKey(dataset: string, priv: boolean): string {
  return `board:${dataset}:${priv}`;
}

/** The round a dataset's board belongs to and where it stands: upcoming, open until its deadline, or frozen at it. */
function RoundNote(p: { comp: Competition | undefined; dataset: string; now: number }) {
  const pol = p.comp?.policy;
  const round = pol?.rounds.find((r) => r.datasets.includes(p.dataset));
  if (!pol || !round) return null;
  const opens = Number(round.opensAtMs) || Number(pol.opensAtMs);
  const closes = Number(round.closesAtMs) || Number(pol.closesAtMs);
  let state;
  if (opens && p.now < opens) state = <>opens {dateTime(opens)}</>;
  else if (closes && p.now >= closes)
    state = <>closed {dateTime(closes)}: the board shows what it showed then (a team's extended deadline still counts)</>;
  else state = closes ? <>open until {dateTime(closes)}</> : <>open</>;
  return (
    <span data-testid="board-round">
      {" "}
      · round <strong>{round.name}</strong>, {state}
    </span>
  );
}

export function Board(p: { dataset: string; priv: boolean }) {
  const app = useApp();
  const comp = app.competitions.find((c) => c.datasets.some((d) => d.name === p.dataset));
  const ref = comp?.datasets.find((d) => d.name === p.dataset);
  const host = app.me.admin || (comp ? app.me.hosts.includes(comp.id) || comp.hosts.includes(app.me.username) : false);
  const canPrivate = host || (comp?.privateRevealed ?? false);
  const now = useNow(15_000);
  const outer = useRef<HTMLDivElement>(null);

  const board = useLive<BoardResponse>(
    boardKey(p.dataset, p.priv),
    (signal) => boards.watchBoard({ dataset: p.dataset, private: p.priv }, { signal }),
    (signal) => boards.board({ dataset: p.dataset, private: p.priv }, { signal }),
  );
  const data = board.data;
  const rows = data?.rows ?? [];
  const metric = data ? metricLine(data.metric, data.direction) : ref ? metricLine(ref.metric, ref.direction) : "";
  const mineAt = app.team ? rows.findIndex((r) => r.team === app.team) : -1;

  const cols: Column<BoardRow>[] = [
    { label: "Rank", track: "5.5rem", cell: (r) => <span class="rank">{r.rank}</span>, class: "num", testid: "board-rank" },
    { label: "Team", track: "minmax(7rem, 1.2fr)", cell: (r) => r.team, class: "strong ellipsis", testid: "board-team" },
    {
      label: "Score",
      track: "minmax(6rem, 0.8fr)",
      cell: (r) => <span title={`best since ${dateTime(r.bestAtMs)}`}>{score(r.score)}</span>,
      class: "num mono",
      testid: "board-score",
    },
    { label: "Model", track: "minmax(10rem, 2fr)", cell: (r) => <span title={r.model}>{r.model}</span>, class: "mono ellipsis" },
    { label: "Count", track: "5.5rem", cell: (r) => r.count, class: "num" },
    { label: "Last Submit", track: "minmax(8rem, 1fr)", cell: (r) => <TimeAgo ms={r.lastSubmitMs} now={now} /> },
  ];

  return (
    <>
      <PageHead
        title={
          <>
            <a class="crumb" href={to.home()}>
              {comp?.title || comp?.id || "Overview"}
            </a>{" "}
            / {p.dataset}
          </>
        }
        sub={
          <>
            {metric && <span data-testid="board-metric">{metric}</span>}
            <RoundNote comp={comp} dataset={p.dataset} now={now} />
            {p.priv && (
              <>
                {" "}
                <Badge tone="purple">private</Badge>
              </>
            )}
          </>
        }
        actions={
          <>
            <a class="btn btn-ghost" href={to.submissions(p.dataset)}>
              {app.team ? "My submissions" : "Submissions"}
            </a>
            {canPrivate && <PrivateSwitch priv={p.priv} onChange={(v) => navigate(to.board(p.dataset, v))} />}
          </>
        }
      />
      <Section
        title={`${p.priv ? "Private" : "Public"} leaderboard`}
        actions={
          mineAt >= 0 ? (
            <button
              class="btn btn-ghost"
              data-testid="board-jump-mine"
              onClick={() => {
                if (outer.current) outer.current.scrollTop = Math.max(0, mineAt * ROW - 3 * ROW);
              }}
            >
              {app.team}: rank {rows[mineAt].rank} of {rows.length}
            </button>
          ) : rows.length ? (
            <span class="muted">
              {rows.length} team{rows.length === 1 ? "" : "s"}
            </span>
          ) : undefined
        }
      >
        <p class="hint">
          {p.priv
            ? "Scores on the private part of the hidden test set: the final ranking is the best score at the deadline."
            : "Scores on the public part of the hidden test set. Only each team's best submit is ranked; a worse one only adds to Count."}
        </p>
        <ErrorNote error={board.error} live={data !== undefined} />
        {board.loading ? (
          <Loading what="the leaderboard" />
        ) : rows.length > 0 ? (
          <VTable
            rows={rows}
            columns={cols}
            rowHeight={ROW}
            rowKey={(r) => r.team}
            rowClass={(r) => (r.team === app.team ? "mine" : "")}
            rowTestid="board-row"
            rowData={(r) => ({ "data-team": r.team, "data-rank": String(r.rank) })}
            testid="board-table"
            label={`${p.dataset} leaderboard`}
            outerRef={outer}
            version={data}
          />
        ) : !board.error ? (
          <Empty title="No scores yet." testid="board-empty">
            The board lists each team's best real submit. Submit a checkpoint with{" "}
            <code>nsml submit SESSION CHECKPOINT</code>; its score appears here as soon as it is scored.
          </Empty>
        ) : null}
        {rows.length > 0 && (
          <p class="hint small">
            Model is <code>TEAM/DATASET/N/CHECKPOINT</code>: the session and checkpoint behind the team's best score.
          </p>
        )}
      </Section>
    </>
  );
}
