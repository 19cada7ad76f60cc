//! The fly coordinator.
