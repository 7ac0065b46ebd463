//! The bench crate (filled by the bench issue).
