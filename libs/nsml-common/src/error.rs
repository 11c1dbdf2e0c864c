//! The platform's one error taxonomy, defined beside the protos so that clients share it:
//! see [`nsml_proto::error`].

pub use nsml_proto::error::*;
