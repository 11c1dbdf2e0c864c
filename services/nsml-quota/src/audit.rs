//! The hosts' audit over the log: replaying every ledger, explaining one decision from the ledger events it
//! rests on, and a ledger as JSON lines to hand to a team in a dispute.

use std::sync::Arc;

use nsml_common::aggregate::Aggregate;
use nsml_eventstore::{EventStore, ScannedEvent, StoreError, StoredEvent};
use nsml_proto::json::to_value;
use nsml_proto::v1::{
    AdmitRequest, Decision, EventRef, Explanation, HeldBy, Override, SessionKind,
};
use serde_json::{Value, json};

use crate::domain::{
    AdoptedPolicy, LEDGER_PREFIX, Ledger, LedgerEvent, SubmitState, describe, fmt_time,
    ledger_stream,
};
use crate::replay::{LedgerReplay, Report, Scope, rederive};

/// How many events one read of the log takes. The first page is read before any replay can start, and the last
/// is replayed after every read has ended, so short pages let the two overlap over more of a small log. On a
/// log of 100 ledgers and 10,100 ledger events (2-core machine, medians of 21 replays), pages of 500 ran at 0.82
/// and 0.90 M events/s in the rounds where pages of 2,000 ran at 0.70–0.74 and of 8,000 at 0.75; a later round
/// of 250, 500 and 1,000 ran at 0.62–0.85, in no order the machine's noise let show.
const PAGE: usize = 1_000;

/// How many runs of one ledger's events (each at most a page) wait for one replaying thread: enough that the
/// log is read on while the threads replay, few enough that a log read faster than it replays does not pile
/// up in memory.
const QUEUED_RUNS: usize = 16;

/// Replays `team`'s ledger, or every ledger in the log: scanned ledger by ledger, and replayed on a few
/// threads at once, a ledger on one thread.
pub async fn replay(
    store: &dyn EventStore,
    scope: &Scope,
    team: Option<&str>,
) -> Result<Report, StoreError> {
    let Some(team) = team else {
        return replay_all(store, scope).await;
    };
    let mut report = Report::default();
    let stream = ledger_stream(team);
    let mut ledger = LedgerReplay::new(team);
    let pages = |last: Option<&StoredEvent>| {
        store.read_stream_page(&stream, last.map_or(0, |e| e.version), PAGE)
    };
    let events = in_pages(pages, |ev| ledger.step(ev, scope, &mut report)).await?;
    report.ledgers = u64::from(events > 0);
    Ok(report)
}

/// Replays every ledger in the log. The ledgers are scanned one after another
/// ([`EventStore::scan_streams`]: no other stream's rows, and no more of each event than replay reads), and
/// each is handed whole to one of a few replaying threads: the ledgers are independent, so the threads replay
/// different teams' ledgers at once while the log is read on. The mismatches are reported in log order.
async fn replay_all(store: &dyn EventStore, scope: &Scope) -> Result<Report, StoreError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let (mut queues, mut replaying) = (Vec::new(), Vec::new());
    for _ in 0..threads {
        let (queue, mut runs) = tokio::sync::mpsc::channel::<Vec<ScannedEvent>>(QUEUED_RUNS);
        let scope = scope.clone();
        replaying.push(tokio::task::spawn_blocking(move || {
            let mut ledgers = Ledgers::default();
            while let Some(run) = runs.blocking_recv() {
                ledgers.take(run, &scope);
            }
            ledgers.report
        }));
        queues.push((queue, 0_usize));
    }
    // The ledger the last page ended in (it may go on in the next), and the thread it went to.
    let mut open: Option<(Arc<str>, usize)> = None;
    let mut page = store.scan_streams(LEDGER_PREFIX, None, PAGE).await?;
    loop {
        // The next page is read while this one is handed out.
        let after = (page.len() == PAGE)
            .then(|| page.last().map(|e| (e.stream.clone(), e.version)))
            .flatten();
        let next = async {
            match &after {
                Some((stream, version)) => store
                    .scan_streams(LEDGER_PREFIX, Some((stream, *version)), PAGE)
                    .await
                    .map(Some),
                None => Ok(None),
            }
        };
        let hand_out = async {
            for run in runs(page) {
                let stream = run[0].stream.clone();
                // A ledger goes on where it went; a new one to the thread given the fewest events so far.
                let thread = match &open {
                    Some((s, thread)) if *s == stream => *thread,
                    _ => (0..threads).min_by_key(|&t| queues[t].1).unwrap_or(0),
                };
                queues[thread].1 += run.len();
                open = Some((stream, thread));
                if queues[thread].0.send(run).await.is_err() {
                    // The thread has ended, which only a panic does: it is raised below.
                    return false;
                }
            }
            true
        };
        let (next, handed_out) = futures::join!(next, hand_out);
        match next? {
            Some(next) if handed_out => page = next,
            _ => break,
        }
    }
    drop(queues);
    let mut report = Report::default();
    for thread in replaying {
        report.add(
            thread
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
        );
    }
    report.mismatches.sort_by_key(|m| m.position);
    Ok(report)
}

/// A page of a scan split into runs of one ledger's events each, in order.
fn runs(mut page: Vec<ScannedEvent>) -> Vec<Vec<ScannedEvent>> {
    let mut runs = Vec::new();
    while let Some(last) = page.last() {
        let run = match page.iter().rposition(|e| e.stream != last.stream) {
            Some(before) => page.split_off(before + 1),
            None => std::mem::take(&mut page),
        };
        runs.push(run);
    }
    runs.reverse();
    runs
}

/// The ledgers one replaying thread is given, replayed one after another.
#[derive(Default)]
struct Ledgers {
    current: Option<(Arc<str>, LedgerReplay)>,
    report: Report,
}

impl Ledgers {
    /// Replays a run of one ledger's events: the ledger this thread replays, going on, or a new one.
    fn take(&mut self, run: Vec<ScannedEvent>, scope: &Scope) {
        let Some(first) = run.first() else {
            return;
        };
        let replay = match &mut self.current {
            Some((stream, replay)) if *stream == first.stream => replay,
            _ => {
                let team = first
                    .stream
                    .strip_prefix(LEDGER_PREFIX)
                    .unwrap_or(&first.stream);
                self.report.ledgers += 1;
                let (_, replay) = self
                    .current
                    .insert((first.stream.clone(), LedgerReplay::new(team)));
                replay
            }
        };
        for ev in &run {
            replay.step(ev, scope, &mut self.report);
        }
    }
}

/// Feeds every event of a paged read to `step`; `read` gives the page after an event (the first page after
/// `None`), and a page shorter than [`PAGE`] is the last. The next page is read while this one is stepped
/// through: a backend that reads off the async threads (SQLite) overlaps the two. Returns the events read.
async fn in_pages<R>(
    read: impl Fn(Option<&StoredEvent>) -> R,
    mut step: impl FnMut(&StoredEvent),
) -> Result<u64, StoreError>
where
    R: Future<Output = Result<Vec<StoredEvent>, StoreError>>,
{
    let mut page = read(None).await?;
    let mut events = 0;
    loop {
        events += page.len() as u64;
        let next = match page.last() {
            Some(last) if page.len() == PAGE => Some(read(Some(last))),
            _ => None,
        };
        let step_page = async {
            page.iter().for_each(&mut step);
        };
        let Some(next) = next else {
            step_page.await;
            return Ok(events);
        };
        let (read, ()) = futures::join!(next, step_page);
        let stepped = std::mem::replace(&mut page, read?);
        // Freeing a page's events costs about a sixth of stepping through them: a blocking thread frees them
        // while the next page is stepped through.
        tokio::task::spawn_blocking(move || drop(stepped));
    }
}

/// The index of the last decision in `events` that `id` names: its decision id, its session or its
/// submission.
pub fn find_decision(events: &[StoredEvent], id: &str) -> Option<usize> {
    events.iter().rposition(|ev| {
        LedgerEvent::decode(ev)
            .and_then(|e| {
                e.decision()
                    .map(|(r, d)| d.id == id || r.session == id || r.submission_id == id)
            })
            .unwrap_or(false)
    })
}

/// Explains the decision recorded at `events[at]` of `team`'s ledger: the state it saw (folded from the
/// events before it), the rule that fired, the decision re-derived now, and the events it rests on.
pub fn explain(team: &str, events: &[StoredEvent], at: usize) -> Option<Explanation> {
    let ev = events.get(at)?;
    let mut ledger = Ledger::default();
    for e in &events[..at] {
        ledger.apply(e);
    }
    let event = LedgerEvent::decode(ev)?;
    let (req, d) = event.decision()?;
    let (mut replayed, differences) = rederive(&ledger, req, d, ev.version);
    replayed.id = d.id.clone();
    let adopted = ledger.policy(&req.competition).cloned();
    let held = held_by(events, &ledger);
    let submits = ledger
        .submits
        .get(&req.dataset)
        .cloned()
        .unwrap_or_default();
    let mut rests_on: Vec<EventRef> = adopted
        .as_ref()
        .map(|a| policy_ref(events, a, &req.competition))
        .into_iter()
        .collect();
    rests_on.extend(held.iter().filter_map(|h| h.granted_by.clone()));
    if req.kind() == SessionKind::Submit {
        rests_on.extend(submit_refs(events, &submits, &req.dataset));
    }
    rests_on.extend(override_refs(events, &ledger, req, d, &replayed));
    rests_on.sort_by_key(|r| r.version);
    rests_on.dedup_by_key(|r| r.version);
    let last_success = submits.last_success();
    Some(Explanation {
        team: team.to_string(),
        request: Some(req.clone()),
        decision: Some(d.clone()),
        event: Some(event_ref(events, ev.version, "the decision".into())),
        policy_version: adopted.as_ref().map_or(0, |a| a.version),
        policy: adopted.map(|a| a.policy),
        held,
        held_total: Some(ledger.held()),
        last_success_ms: last_success.map_or(0, |l| l.at_ms),
        last_success_submission_id: last_success
            .map(|l| l.submission_id.to_string())
            .unwrap_or_default(),
        in_flight_submissions: submits
            .counted_in_flight()
            .map(|(s, _)| s.clone())
            .collect(),
        overrides: overrides_in_force(&ledger, req, d.decided_at_ms),
        rule: if d.granted {
            "granted".into()
        } else {
            d.rule.clone()
        },
        replayed: Some(replayed),
        replay_matches: differences.is_empty(),
        rests_on,
        other_decisions: other_decisions(events, at, req),
        differences,
    })
}

/// The event by which the ledger adopted the competition's policy a decision applied.
fn policy_ref(events: &[StoredEvent], adopted: &AdoptedPolicy, competition: &str) -> EventRef {
    event_ref(
        events,
        adopted.since,
        format!(
            "policy version {} of competition `{competition}` adopted by the ledger",
            adopted.version
        ),
    )
}

/// The sessions holding resources, each with the grant it holds them by.
fn held_by(events: &[StoredEvent], ledger: &Ledger) -> Vec<HeldBy> {
    ledger
        .holdings
        .iter()
        .map(|(s, h)| HeldBy {
            session: s.clone(),
            resources: Some(h.resources),
            kind: h.kind as i32,
            submission_id: h.submission_id.clone(),
            granted_by: Some(event_ref(
                events,
                h.since,
                format!("{s} holds {}", describe(&h.resources)),
            )),
        })
        .collect()
}

/// The overrides of the request's competition in force when it was decided.
fn overrides_in_force(ledger: &Ledger, req: &AdmitRequest, at_ms: i64) -> Vec<Override> {
    ledger
        .overrides
        .values()
        .filter(|o| o.grant.competition == req.competition && o.in_force(at_ms))
        .map(|o| o.view())
        .collect()
}

/// The grants of the overrides a decision rests on: those the recorded or the re-derived decision applied,
/// those raising the competition's limits, and for a submit the extra submits on its dataset.
fn override_refs(
    events: &[StoredEvent],
    ledger: &Ledger,
    req: &AdmitRequest,
    d: &Decision,
    replayed: &Decision,
) -> Vec<EventRef> {
    let is_submit = req.kind() == SessionKind::Submit;
    ledger
        .overrides
        .iter()
        .filter(|(id, o)| {
            d.overrides.contains(id)
                || replayed.overrides.contains(id)
                || o.raises(&req.competition, d.decided_at_ms)
                || (is_submit && o.extra_in_force(&req.dataset, d.decided_at_ms))
        })
        .map(|(_, o)| event_ref(events, o.since, o.view().description))
        .collect()
}

/// A reference to the ledger event at `version`, with why it matters.
fn event_ref(events: &[StoredEvent], version: u64, note: String) -> EventRef {
    match events.binary_search_by_key(&version, |e| e.version) {
        Ok(i) => EventRef {
            position: events[i].position,
            version,
            event_type: events[i].event_type.clone(),
            recorded_at_ms: events[i].metadata.recorded_at_ms,
            note,
        },
        Err(_) => EventRef {
            version,
            note,
            ..Default::default()
        },
    }
}

/// The submit history a submit's decision rests on: the success that starts the interval and the submits in
/// flight that count.
fn submit_refs(events: &[StoredEvent], submits: &SubmitState, dataset: &str) -> Vec<EventRef> {
    let mut refs = Vec::new();
    if let Some(l) = submits.last_success() {
        refs.push(event_ref(
            events,
            l.version,
            format!(
                "submission {} on `{dataset}` succeeded; it was submitted at {}, which starts the interval",
                l.submission_id,
                fmt_time(l.at_ms)
            ),
        ));
    }
    for (sub, v) in submits.counted_in_flight() {
        refs.push(event_ref(
            events,
            *v,
            format!("submission {sub} on `{dataset}` admitted and not ended"),
        ));
    }
    refs
}

/// The other decisions recorded for the same session or submission, newest first.
fn other_decisions(events: &[StoredEvent], at: usize, req: &AdmitRequest) -> Vec<String> {
    events
        .iter()
        .enumerate()
        .rev()
        .filter(|(i, _)| *i != at)
        .filter_map(|(_, e)| {
            let e = LedgerEvent::decode(e)?;
            let (r, od) = e.decision()?;
            let same = r.session == req.session
                || (!req.submission_id.is_empty() && r.submission_id == req.submission_id);
            same.then(|| {
                format!(
                    "{}: {} at {}",
                    od.id,
                    if od.granted {
                        "granted".to_string()
                    } else {
                        format!("refused ({})", od.rule)
                    },
                    fmt_time(od.decided_at_ms)
                )
            })
        })
        .collect()
}

fn time(ms: i64) -> Value {
    if ms == 0 {
        Value::Null
    } else {
        Value::String(fmt_time(ms))
    }
}

fn resources_json(r: Option<&nsml_proto::v1::Resources>) -> Value {
    to_value(&r.copied().unwrap_or_default())
}

fn kind_name(k: SessionKind) -> &'static str {
    match k {
        SessionKind::Train => "train",
        SessionKind::TrialSubmit => "trial",
        SessionKind::Submit => "submit",
        SessionKind::Unspecified => "unspecified",
    }
}

/// An override as JSON, with its end also as UTC text.
pub fn override_json(o: &Override) -> Value {
    let mut v = to_value(o);
    v["until"] = time(o.until_ms);
    v
}

fn decision_json(req: &nsml_proto::v1::AdmitRequest, d: &nsml_proto::v1::Decision) -> Value {
    let mut request = to_value(req);
    request["kind"] = kind_name(req.kind()).into();
    let mut decision = to_value(d);
    decision["retry_after"] = time(d.retry_after_ms);
    decision["decided_at"] = time(d.decided_at_ms);
    json!({ "request": request, "decision": decision })
}

/// One ledger event as a JSON object: where it sits in the log, its envelope and its content.
pub fn event_json(ev: &StoredEvent) -> Value {
    let data = match LedgerEvent::decode(ev) {
        Some(LedgerEvent::Granted(e)) => match (&e.request, &e.decision) {
            (Some(r), Some(d)) => decision_json(r, d),
            _ => Value::Null,
        },
        Some(LedgerEvent::Denied(e)) => match (&e.request, &e.decision) {
            (Some(r), Some(d)) => decision_json(r, d),
            _ => Value::Null,
        },
        Some(LedgerEvent::Released(e)) => json!({
            "session": e.session,
            "resources": resources_json(e.resources.as_ref()),
            "cause": e.cause,
            "at_ms": e.at_ms,
        }),
        Some(LedgerEvent::Succeeded(e)) => json!({
            "dataset": e.dataset,
            "submission_id": e.submission_id,
            "submitted_at_ms": e.at_ms,
            "submitted_at": time(e.at_ms),
        }),
        Some(LedgerEvent::Ended(e)) => json!({
            "dataset": e.dataset,
            "submission_id": e.submission_id,
            "succeeded": e.succeeded,
            "at_ms": e.at_ms,
        }),
        Some(LedgerEvent::PolicyChanged(e)) => {
            let p = e.policy.unwrap_or_default();
            json!({
                "competition": e.competition,
                "version": e.version,
                "policy": {
                    "team_gpus": p.team_gpus,
                    "team_cpus": p.team_cpus,
                    "team_memory_bytes": p.team_memory_bytes,
                    "team_sessions": p.team_sessions,
                    "team_storage_bytes": p.team_storage_bytes,
                    "submit_interval_secs": p.submit_interval_secs,
                    "submit_time_limit_secs": p.submit_time_limit_secs,
                    "submit_max_cpus": p.submit_max_cpus,
                },
            })
        }
        Some(LedgerEvent::Override(e)) => e.grant.as_ref().map_or(Value::Null, override_json),
        None => Value::Null,
    };
    json!({
        "position": ev.position,
        "stream": ev.stream,
        "version": ev.version,
        "type": ev.event_type.strip_prefix("nsml.v1.").unwrap_or(&ev.event_type),
        "event_id": ev.metadata.event_id,
        "command_id": ev.metadata.command_id,
        "actor": ev.metadata.actor,
        "recorded_at_ms": ev.metadata.recorded_at_ms,
        "recorded_at": time(ev.metadata.recorded_at_ms),
        "hash": ev.hash,
        "data": data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic;

    #[tokio::test]
    async fn the_whole_log_replays_every_ledger_among_other_streams() {
        use nsml_eventstore::{ExpectedVersion, SqliteStore};
        let store = SqliteStore::in_memory().await.unwrap();
        let mut a = synthetic::ledger("a", 3_000, 1);
        let b = synthetic::ledger("b", 1_500, 2);
        // Team a's ledger with one decision tampered, so a mismatch must be found across pages.
        use nsml_proto::v1::{AdmissionDenied, EventPayload};
        use prost::Message;
        let at = a
            .iter()
            .rposition(|e| e.event_type == AdmissionDenied::TYPE)
            .unwrap();
        let mut denied = AdmissionDenied::decode(a[at].payload.as_slice()).unwrap();
        denied.decision.as_mut().unwrap().retry_after_ms -= 1;
        a[at].payload = denied.encode_to_vec();
        // Interleaved with other streams, one of them holding ledger events under another name.
        for i in 0..6 {
            for (stream, events) in [
                ("quota-a", &a[i * 500..(i + 1) * 500]),
                ("sessions-a", &b[..100]),
                ("quota-b", &b[(i * 250)..(i + 1) * 250]),
                ("quotas-b", &b[..100]),
            ] {
                store
                    .append(stream, ExpectedVersion::Any, synthetic::to_append(events))
                    .await
                    .unwrap();
            }
        }
        let all = replay(&store, &Scope::default(), None).await.unwrap();
        let (ra, rb) = (
            replay(&store, &Scope::default(), Some("a")).await.unwrap(),
            replay(&store, &Scope::default(), Some("b")).await.unwrap(),
        );
        assert_eq!(all.ledgers, 2);
        assert_eq!(all.events, 4_500);
        assert_eq!(all.events, ra.events + rb.events);
        assert_eq!(all.decisions, ra.decisions + rb.decisions);
        assert_eq!(all.matched, ra.matched + rb.matched);
        assert_eq!(rb.mismatches, vec![]);
        assert!(!ra.mismatches.is_empty());
        assert_eq!(all.mismatches, ra.mismatches);
        assert_eq!(all.mismatches[0].version, at as u64 + 1);
    }

    /// Many ledgers, small and large, some across pages: the replay of every ledger (on several threads)
    /// reports what the replays of each team report, with the tampered decisions in log order.
    #[tokio::test]
    async fn many_ledgers_replay_as_each_alone() {
        use nsml_eventstore::{ExpectedVersion, SqliteStore};
        use nsml_proto::v1::{AdmissionDenied, EventPayload};
        use prost::Message;
        let store = SqliteStore::in_memory().await.unwrap();
        let teams: Vec<String> = (0..37).map(|i| format!("t{:02}", 36 - i)).collect();
        let mut tampered = Vec::new();
        for (i, team) in teams.iter().enumerate() {
            let size = [3, 40, 250, 1_700][i % 4];
            let mut events = synthetic::ledger(team, size, i as u64);
            if i % 5 == 0
                && let Some(at) = events
                    .iter()
                    .rposition(|e| e.event_type == AdmissionDenied::TYPE)
            {
                let mut denied = AdmissionDenied::decode(events[at].payload.as_slice()).unwrap();
                denied.decision.as_mut().unwrap().retry_after_ms += 1;
                events[at].payload = denied.encode_to_vec();
                tampered.push(team.clone());
            }
            // Each ledger in two appends, between other teams' appends, so positions interleave.
            let half = events.len() / 2;
            for part in [&events[..half], &events[half..]] {
                store
                    .append(
                        &ledger_stream(team),
                        ExpectedVersion::Any,
                        synthetic::to_append(part),
                    )
                    .await
                    .unwrap();
                store
                    .append(
                        &format!("sessions-{team}"),
                        ExpectedVersion::Any,
                        synthetic::to_append(&events[..1]),
                    )
                    .await
                    .unwrap();
            }
        }
        let all = replay(&store, &Scope::default(), None).await.unwrap();
        let mut each = Report::default();
        for team in &teams {
            each.add(replay(&store, &Scope::default(), Some(team)).await.unwrap());
        }
        each.mismatches.sort_by_key(|m| m.position);
        assert_eq!(all, each);
        assert_eq!(all.ledgers, 37);
        assert!(!tampered.is_empty());
        let mut found: Vec<String> = all.mismatches.iter().map(|m| m.team.clone()).collect();
        found.dedup();
        found.sort();
        tampered.sort();
        assert_eq!(found, tampered);
        assert!(all.mismatches.is_sorted_by_key(|m| m.position));
    }

    #[test]
    fn a_refused_submit_is_explained_by_the_earlier_success() {
        let events = synthetic::ledger("demo", 3_000, 11);
        let at = events
            .iter()
            .position(|e| {
                LedgerEvent::decode(e)
                    .and_then(|e| e.decision().map(|(_, d)| d.rule == "submit_interval"))
                    .unwrap_or(false)
            })
            .unwrap();
        let id = LedgerEvent::decode(&events[at])
            .and_then(|e| e.decision().map(|(r, _)| r.session.clone()))
            .unwrap();
        assert_eq!(find_decision(&events, &id), Some(at));
        let x = explain("demo", &events, at).unwrap();
        assert_eq!(x.rule, "submit_interval");
        assert!(x.replay_matches, "{:?}", x.differences);
        assert!(x.last_success_ms > 0);
        assert!(!x.last_success_submission_id.is_empty());
        let success = x
            .rests_on
            .iter()
            .find(|r| r.event_type == "nsml.v1.SubmitSucceeded")
            .expect("rests on the earlier success");
        assert!(
            success.note.contains(&x.last_success_submission_id),
            "{}",
            success.note
        );
        assert!(
            x.rests_on
                .iter()
                .any(|r| r.event_type == "nsml.v1.PolicyChanged")
        );
        let retry = x.decision.unwrap().retry_after_ms;
        let interval = x.policy.unwrap().submit_interval_secs as i64 * 1000;
        assert_eq!(retry, x.last_success_ms + interval);
    }

    #[test]
    fn a_submit_let_in_by_a_reopened_slot_is_explained_by_the_override() {
        let mut s = synthetic::Script::new("demo");
        let (stuck, _) = s.at(0).submit("t1-cls");
        let reopened = s.at(60_000).reopen(&stuck);
        let (next, granted) = s.at(120_000).submit("t1-cls");
        assert!(granted);
        let events = s.events().to_vec();
        let at = find_decision(&events, &next).unwrap();
        let x = explain("demo", &events, at).unwrap();
        assert!(x.replay_matches, "{:?}", x.differences);
        assert_eq!(
            x.decision.as_ref().unwrap().overrides,
            vec![reopened.clone()]
        );
        // The stuck submit runs on, but not as the team's submit in flight.
        assert!(x.in_flight_submissions.is_empty(), "{x:?}");
        assert!(x.held.iter().any(|h| h.submission_id == stuck));
        let o = x.overrides.iter().find(|o| o.id == reopened).unwrap();
        assert!(
            o.description.starts_with(&format!(
                "override {reopened}: re-opened the slot of submit {stuck} on `t1-cls`, granted by user:host at 2026-01-01T00:01:00Z (generated)"
            )),
            "{}",
            o.description
        );
        let rests = x
            .rests_on
            .iter()
            .find(|r| r.event_type == "nsml.v1.OverrideGranted")
            .expect("rests on the override");
        assert_eq!(rests.note, o.description);
        assert_eq!(override_json(o)["kind"], "reopen_submit");
    }

    #[test]
    fn export_lines_carry_the_decisions() {
        let events = synthetic::ledger("demo", 50, 2);
        let lines: Vec<Value> = events.iter().map(event_json).collect();
        assert_eq!(lines[0]["type"], "PolicyChanged");
        assert_eq!(lines[0]["data"]["policy"]["team_gpus"], 2);
        let d = lines
            .iter()
            .find(|l| l["type"] == "AdmissionDenied" || l["type"] == "ResourcesGranted")
            .unwrap();
        assert!(d["data"]["decision"]["id"].as_str().is_some());
        assert_eq!(d["data"]["request"]["team"], "demo");
    }
}
