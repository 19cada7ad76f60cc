//! Hardware topology detection (placeholder; filled in by the topology work).
