//! nsml-storage
