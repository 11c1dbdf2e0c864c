//! The rules an admission can be refused by. Each has a wire name, which is what a recorded decision, the
//! audit's output and the API carry: the log is hash-chained and replayed, so the names never change.

use std::fmt;

/// A rule that refused an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// The session already holds resources.
    Duplicate,
    /// The competition has not opened yet.
    NotOpen,
    /// A submit after the competition (or the team's extended deadline) closed.
    Closed,
    /// The team has a real submit of the dataset in flight.
    SubmitInFlight,
    /// The submit interval has not passed since the team's last successful real submit of the dataset.
    SubmitInterval,
    /// A submit asks for more CPUs than a submit may use.
    SubmitCpus,
    /// The team runs as many sessions as it may at once.
    TeamSessions,
    /// The team's GPUs with the request exceed its limit.
    TeamGpus,
    /// The team's CPUs with the request exceed its limit.
    TeamCpus,
    /// The team's memory, shared memory included, with the request exceeds its limit.
    TeamMemory,
}

impl Rule {
    /// Every rule, in the order `decide` applies them.
    pub const ALL: [Rule; 10] = [
        Rule::Duplicate,
        Rule::NotOpen,
        Rule::Closed,
        Rule::SubmitInFlight,
        Rule::SubmitInterval,
        Rule::SubmitCpus,
        Rule::TeamSessions,
        Rule::TeamGpus,
        Rule::TeamCpus,
        Rule::TeamMemory,
    ];

    /// The rule's name as recorded decisions carry it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Rule::Duplicate => "duplicate",
            Rule::NotOpen => "not_open",
            Rule::Closed => "closed",
            Rule::SubmitInFlight => "submit_in_flight",
            Rule::SubmitInterval => "submit_interval",
            Rule::SubmitCpus => "submit_cpus",
            Rule::TeamSessions => "team_sessions",
            Rule::TeamGpus => "team_gpus",
            Rule::TeamCpus => "team_cpus",
            Rule::TeamMemory => "team_memory",
        }
    }

    /// The rule a recorded decision names, if it is one of these.
    pub fn parse(name: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<Rule> for String {
    fn eq(&self, rule: &Rule) -> bool {
        self == rule.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_keeps_the_name_recorded_decisions_carry() {
        // Given the names the log has carried since the first decision (the schedule's since it came),
        let names = [
            "duplicate",
            "not_open",
            "closed",
            "submit_in_flight",
            "submit_interval",
            "submit_cpus",
            "team_sessions",
            "team_gpus",
            "team_cpus",
            "team_memory",
        ];
        // when each rule is written and read back,
        let written: Vec<&str> = Rule::ALL.iter().map(|r| r.as_str()).collect();
        // then it travels under the same name, and the name reads back as the rule.
        assert_eq!(written, names);
        for rule in Rule::ALL {
            assert_eq!(Rule::parse(rule.as_str()), Some(rule));
            assert_eq!(rule.to_string(), rule.as_str());
        }
        assert_eq!(Rule::parse("team_storage"), None);
    }
}
