//! The shared-memory contract between the daemon (writer) and readers.
#![allow(unsafe_code)]
pub mod layout;
pub mod reader;
pub mod writer;
