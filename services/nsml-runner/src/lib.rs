//! nsml-runner
