//! Worker building blocks: contact slab, timer wheel, liveness.
pub mod liveness;
pub mod slab;
pub mod wheel;
pub mod worker;
