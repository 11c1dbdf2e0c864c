//! The platform's services, listed once: adding a service adds a variant here, and every list of services
//! (clients, the gateway's routes, a deployment's processes, the tests' deployments) follows from it.

use serde::{Deserialize, Serialize};

/// One of the platform's gRPC services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    Auth,
    Storage,
    Quota,
    Leaderboard,
    Submission,
    Session,
}

impl Service {
    /// Every service, in the order a deployment starts them: a service starts after those it calls while
    /// starting, and the session service (which dispatches to the runner) last.
    pub const ALL: [Service; 6] = [
        Service::Auth,
        Service::Storage,
        Service::Quota,
        Service::Leaderboard,
        Service::Submission,
        Service::Session,
    ];

    /// The service's name in configuration, logs and `x-nsml-service`: `auth`, `storage`, …
    pub const fn name(self) -> &'static str {
        match self {
            Service::Auth => "auth",
            Service::Storage => "storage",
            Service::Quota => "quota",
            Service::Leaderboard => "leaderboard",
            Service::Submission => "submission",
            Service::Session => "session",
        }
    }

    /// The fully qualified gRPC service a call's path starts with: `nsml.v1.AuthService`, …
    pub const fn grpc_name(self) -> &'static str {
        match self {
            Service::Auth => "nsml.v1.AuthService",
            Service::Storage => "nsml.v1.StorageService",
            Service::Quota => "nsml.v1.QuotaService",
            Service::Leaderboard => "nsml.v1.LeaderboardService",
            Service::Submission => "nsml.v1.SubmissionService",
            Service::Session => "nsml.v1.SessionService",
        }
    }

    /// The service named `name` (as [`Service::name`] spells it).
    pub fn parse(name: &str) -> Option<Service> {
        Service::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The service that owns a gRPC path such as `/nsml.v1.SessionService/Run`.
    pub fn of_path(path: &str) -> Option<Service> {
        let grpc = path.strip_prefix('/')?.split('/').next()?;
        Service::ALL.into_iter().find(|s| s.grpc_name() == grpc)
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_is_named_once_and_found_by_name_and_path() {
        let names: std::collections::HashSet<_> = Service::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(names.len(), Service::ALL.len());
        for s in Service::ALL {
            assert_eq!(Service::parse(s.name()), Some(s));
            assert_eq!(
                Service::of_path(&format!("/{}/Any", s.grpc_name())),
                Some(s)
            );
        }
        assert_eq!(Service::of_path("/nsml.v1.Nothing/Run"), None);
        assert_eq!(Service::of_path("nsml.v1.AuthService"), None);
    }

    #[test]
    fn every_service_is_in_the_generated_descriptor() {
        let fds = <prost_types::FileDescriptorSet as prost::Message>::decode(
            nsml_proto::v1::FILE_DESCRIPTOR_SET,
        )
        .expect("descriptor");
        let declared: std::collections::HashSet<String> = fds
            .file
            .iter()
            .flat_map(|f| {
                let package = f.package().to_string();
                f.service
                    .iter()
                    .map(move |s| format!("{package}.{}", s.name()))
            })
            .collect();
        for s in Service::ALL {
            assert!(declared.contains(s.grpc_name()), "{s} is not in proto/");
        }
    }
}
