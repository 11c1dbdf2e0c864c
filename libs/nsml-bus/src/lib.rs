//! nsml-bus
