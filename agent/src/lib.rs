//! The fly agent.
