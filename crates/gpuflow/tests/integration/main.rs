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
mod dashboard;
mod diagnosis;
mod durability;
mod failures;
mod faults;
mod pools;
mod processes;
mod reload;
mod scheduling;
mod store_suite;
