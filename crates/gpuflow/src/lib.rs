//! gpuflow: a workflow engine that runs AI inference pipelines on GPUs without stalling.
//!
//! See `docs/ARCHITECTURE.md` for the map. In short: `config` parses pipeline files,
//! `runtime` owns the one loop that drives `gpuflow_core`'s state machine, `store` keeps every
//! change durable, `supervisor` runs and reaps processes, `api` serves HTTP and `cli` is the
//! command line.

pub mod api;
pub mod cli;
pub mod config;
pub mod gpu;
pub mod retention;
pub mod runtime;
pub mod serve;
pub mod store;
pub mod supervisor;
