//! nsml-gateway
