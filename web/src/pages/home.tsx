// Competition home: the datasets with their metric and direction, and the overall ranking across them.
import { useState } from "preact/hooks";
import { useApp } from "../app";
import { boards, storage } from "../api";
import type { Competition } from "../gen/nsml/v1/auth_pb";
import type { OverallResponse, OverallRow } from "../gen/nsml/v1/leaderboard_pb";
import { bytes, duration, metricLine, num } from "../format";
import { useCall, useLive, useNow } from "../live";
import { to } from "../router";
import { Badge, Empty, ErrorNote, Loading, PageHead, Section, TimeAgo } from "../components/ui";
import { PrivateSwitch } from "../components/switch";
import { VTable, type Column } from "../components/vtable";

export function Home() {
  const app = useApp();
  const comp = app.comp;
  if (!comp) {
    return (
      <>
        <PageHead title="No competition yet" />
        <Empty title="You are not in any competition.">
          {app.anyHost ? (
            <>
              Register one with <code>nsml admin competition apply FILE</code>, then reload this page.
            </>
          ) : (
            "Ask the competition's host to add you to a team; it will show here once you are in one."
          )}
        </Empty>
      </>
    );
  }
  return <CompetitionHome comp={comp} />;
}

function CompetitionHome(p: { comp: Competition }) {
  const app = useApp();
  const comp = p.comp;
  const canPrivate = app.host || comp.privateRevealed;
  const [priv, setPriv] = useState(false);
  const showPriv = priv && canPrivate;
  const now = useNow(30_000);

  const datasets = useCall(`ds:${comp.id}`, (signal) => storage.listDatasets({ competition: comp.id }, { signal }));
  const overall = useLive<OverallResponse>(
    `overall:${comp.id}:${showPriv}`,
    (signal) => boards.watchOverall({ competition: comp.id, private: showPriv }, { signal }),
    (signal) => boards.overall({ competition: comp.id, private: showPriv }, { signal }),
  );

  const info = new Map((datasets.data?.datasets ?? []).map((d) => [d.meta?.name ?? "", d]));
  const policy = comp.policy;

  return (
    <>
      <PageHead
        title={comp.title || comp.id}
        sub={
          <>
            {comp.datasets.length} dataset{comp.datasets.length === 1 ? "" : "s"} · {comp.teams.length} team
            {comp.teams.length === 1 ? "" : "s"}
            {comp.privateRevealed ? (
              <>
                {" "}
                · <Badge tone="purple">private board revealed</Badge>
              </>
            ) : null}
          </>
        }
      />

      <Section title="Datasets">
        {comp.datasets.length === 0 ? (
          <Empty title="No datasets yet.">The host registers datasets with the competition manifest; they will show here.</Empty>
        ) : (
          <div class="ds-grid" data-testid="dataset-list">
            {comp.datasets.map((d) => {
              const more = info.get(d.name);
              return (
                <a class="ds-card" href={to.board(d.name)} key={d.name} data-testid="dataset-card" data-dataset={d.name}>
                  <div class="ds-name">{d.name}</div>
                  <div class="ds-metric">{metricLine(d.metric, d.direction)}</div>
                  {more?.meta?.description && <div class="ds-desc">{more.meta.description}</div>}
                  <div class="ds-meta muted">
                    {more ? (
                      <>
                        {bytes(more.sizeBytes)} · {num(more.testItems)} test items
                        {more.hasTrial ? " · trial set" : ""}
                        {num(more.updatedAtMs) ? (
                          <>
                            {" "}
                            · updated <TimeAgo ms={more.updatedAtMs} now={now} />
                          </>
                        ) : null}
                      </>
                    ) : (
                      "Leaderboard →"
                    )}
                  </div>
                </a>
              );
            })}
          </div>
        )}
        <ErrorNote error={datasets.error} />
      </Section>

      <Section
        title={showPriv ? "Overall ranking · private" : "Overall ranking"}
        actions={canPrivate ? <PrivateSwitch priv={showPriv} onChange={setPriv} /> : undefined}
      >
        <p class="hint">Teams ranked by their mean rank over the datasets; a dataset without a score ranks last.</p>
        <ErrorNote error={overall.error} live={overall.data !== undefined} />
        {overall.loading ? (
          <Loading what="the ranking" />
        ) : overall.data && overall.data.rows.length > 0 ? (
          <OverallTable data={overall.data} myTeam={app.team} />
        ) : !overall.error ? (
          <Empty title="No team is ranked yet." testid="overall-empty">
            The ranking fills in as teams' real submits are scored. Train a model, then <code>nsml submit SESSION CHECKPOINT</code>.
          </Empty>
        ) : null}
      </Section>

      {policy && (
        <Section title="Rules">
          <dl class="facts">
            <dt>Per team</dt>
            <dd>
              {policy.teamGpus} GPUs · {policy.teamCpus} CPUs · {bytes(policy.teamMemoryBytes)} memory · {policy.teamSessions}{" "}
              sessions at once
            </dd>
            <dt>Checkpoint storage</dt>
            <dd>{bytes(policy.teamStorageBytes)} per team</dd>
            <dt>Real submits</dt>
            <dd>
              one per {duration(num(policy.submitIntervalSecs) * 1000)} per dataset, counted from the last successful one; each
              must finish within {duration(num(policy.submitTimeLimitSecs) * 1000)}, with at most {policy.submitMaxCpus} CPUs
            </dd>
          </dl>
        </Section>
      )}
    </>
  );
}

function OverallTable(p: { data: OverallResponse; myTeam: string }) {
  const cols: Column<OverallRow>[] = [
    { label: "Rank", track: "5.5rem", cell: (r) => <span class="rank">{r.rank}</span>, class: "num" },
    { label: "Team", track: "minmax(8rem, 2fr)", cell: (r) => r.team, class: "strong ellipsis" },
    { label: "Mean rank", track: "8.5rem", cell: (r) => r.meanRank.toFixed(2), class: "num" },
    ...p.data.datasets.map<Column<OverallRow>>((d, i) => ({
      label: <a href={to.board(d, p.data.private)}>{d}</a>,
      track: "minmax(6rem, 1fr)",
      cell: (r) => (r.submitted[i] === false ? `no submission (${r.ranks[i]})` : r.ranks[i] ? r.ranks[i] : "—"),
      class: "num",
    })),
  ];
  return (
    <VTable
      rows={p.data.rows}
      columns={cols}
      rowKey={(r) => r.team}
      rowClass={(r) => (r.team === p.myTeam ? "mine" : "")}
      rowTestid="overall-row"
      rowData={(r) => ({ "data-team": r.team })}
      testid="overall-table"
      label="Overall ranking"
    />
  );
}
