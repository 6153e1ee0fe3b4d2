//! SIP bytes only: no I/O, no clock, no allocation on the per-packet paths.
pub mod reply;
pub mod template;
pub mod token;
pub mod uri;
