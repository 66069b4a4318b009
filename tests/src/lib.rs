//! Helpers for the cross-crate integration and two-site tests.
