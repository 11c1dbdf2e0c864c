//! The `nsml.v1` protobuf messages and gRPC services, generated from `proto/` at build time.

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod codec;
pub mod error;
pub mod json;
pub mod policy;

/// The platform's calls between its own services and runners (`proto/nsml/internal/v1`): served on the
/// services' internal ports, never routed by the gateway.
pub mod internal {
    pub mod v1 {
        tonic::include_proto!("nsml.internal.v1");
        include!(concat!(env!("OUT_DIR"), "/clients/nsml.internal.v1.rs"));
        include!(concat!(env!("OUT_DIR"), "/internal_methods.rs"));
    }
}

pub mod v1 {
    tonic::include_proto!("nsml.v1");
    include!(concat!(env!("OUT_DIR"), "/clients/nsml.v1.rs"));

    include!(concat!(env!("OUT_DIR"), "/type_names.rs"));

    /// The encoded file descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/nsml_descriptor.bin"));

    /// The encoded file descriptor set of the public API alone (`nsml.v1`), for reflection on the gateway.
    pub const PUBLIC_FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/nsml_public_descriptor.bin"));

    /// Names an event payload by its full protobuf type name, as stored in the log.
    pub trait EventPayload: prost::Message + Default {
        const TYPE: &'static str;
    }

    macro_rules! events {
        ($($name:ident),* $(,)?) => {
            $(impl EventPayload for $name {
                const TYPE: &'static str = concat!("nsml.v1.", stringify!($name));
            })*
        };
    }

    events!(
        UserRegistered,
        PasswordChanged,
        TeamCreated,
        MemberAdded,
        CompetitionApplied,
        PrivateRevealed,
        TokenIssued,
        TokenRevoked,
        DatasetRegistered,
        CodeUploaded,
        CheckpointSaved,
        CheckpointDeleted,
        SessionRequested,
        SessionAdmitted,
        SessionRejected,
        SessionStarted,
        MetricsReported,
        SessionExited,
        SessionFailed,
        SessionStopRequested,
        SessionStopped,
        SessionRemoved,
        MemoChanged,
        ResourcesGranted,
        AdmissionDenied,
        ResourcesReleased,
        SubmitSucceeded,
        SubmitEnded,
        PolicyChanged,
        OverrideGranted,
        SubmissionRequested,
        SubmissionAdmitted,
        SubmissionPredictionsTaken,
        SubmissionRejected,
        SubmissionScored,
        SubmissionFailed,
        SubmissionTimedOut,
    );
}
