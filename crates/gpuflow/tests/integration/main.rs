//! The one integration-test binary: each test boots the real engine in a temp dir.

mod fixture;

mod api;
mod batching;
mod chaos;
mod chaos_fuzz;
mod chaos_load;
mod chaos_workers;
mod cli;
mod cluster;
mod config_check;
mod dashboard;
mod diagnosis;
mod diagnosis_trees;
mod durability;
mod failures;
mod faults;
mod metrics;
mod order;
mod pools;
mod processes;
mod progress;
mod reload;
mod scheduling;
mod store_suite;
mod waiting;
