//! Competition policies, as the quota service learns them from the log.

use std::collections::HashMap;

use nsml_common::event::decode;
use nsml_common::projection::ReadModel;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{CompetitionApplied, Policy};

#[derive(Debug, Default)]
pub struct Policies {
    /// Competition → (policy, version).
    pub policies: HashMap<String, (Policy, u64)>,
}

impl ReadModel for Policies {
    fn apply(&mut self, ev: &StoredEvent) {
        if let Some(e) = decode::<CompetitionApplied>(ev)
            && let Some(c) = e.competition
        {
            self.policies
                .insert(c.id, (c.policy.unwrap_or_default(), c.policy_version));
        }
    }
}
