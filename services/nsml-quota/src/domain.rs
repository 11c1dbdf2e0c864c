//! The quota rules, pure: the team ledger and how its events fold, the admission rule
//! `decide(ledger, policy, request, now) -> Decision` and the rules it applies, when a team's next submit is
//! allowed, what a host's override must say and where it applies, and the outside facts a ledger records.
//!
//! Everything a decision depends on is ledger state: the resources sessions hold, the submit history per
//! dataset, the competition policy the ledger adopted (`PolicyChanged`) and the hosts' overrides
//! (`OverrideGranted`). So folding one `quota-TEAM` stream alone re-derives every decision recorded in it.
//!
//! A host's override applies from its ledger version on: the decisions recorded before it saw a ledger without
//! it, and replay re-derives them so. Nothing here does IO: what a rule needs is read first and passed in.

mod admission;
mod format;
mod ledger;
mod overrides;
mod release;
mod rule;
mod submits;

pub use admission::{adopt, decide};
pub use format::{describe, describe_override, fmt_time, gib, human_secs};
pub use ledger::{
    AdoptedPolicy, Holding, LEDGER_PREFIX, LastSuccess, Ledger, LedgerEvent, Limits, OverrideState,
    ReopenRefused, SubmitState, SuccessKey, Wide, interval_ms, ledger_stream,
};
pub use overrides::{
    Granting, OverrideRefused, Placement, check_placement, check_request, check_round,
    failed_submit, new_override, override_competition, per_dataset, reopen_dataset,
};
pub use release::{SessionEnd, SubmitOutcome, release, submit_outcome};
pub use rule::Rule;
pub use submits::{next_submit, on_schedule};

#[cfg(test)]
mod tests;
