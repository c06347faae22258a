//! The balancing contracts of DESIGN.md §4, tested through the public API.
//!
//! Every test runs on a manual clock and a seeded RNG: the figures below are
//! exact and the same on every run.

mod common;

mod features;
mod least;
mod maglev;
mod outlier;
mod peak_ewma;
mod random;
mod robustness;
mod rotation;
