//! nsml-submission
