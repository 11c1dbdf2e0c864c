//! nsml-integration-tests
