//! The pure core of gpuflow: domain types, the scheduling state machine and the retry policy.
//!
//! Nothing here does IO, reads the clock or the environment, or spawns processes: time and ids
//! are passed in. That keeps every scheduling decision testable by stepping `State::apply`.

pub mod cluster;
pub mod diagnosis;
pub mod order;
pub mod pipeline;
pub mod resources;
pub mod retry;
pub mod rules;
pub mod scheduler;

pub use pipeline::{Pipeline, PipelineError, StageIndex, StageSpec};
pub use resources::{ByteSize, Capacity, GpuDevice, Grant, Inventory, RequestError, ResourceRequest, Usage};
pub use retry::RetryPolicy;
pub use scheduler::{
    Action, ApplyError, AttemptResult, Event, JobId, JobRun, JobState, KillReason, Lease, Outcome, RestoredStage,
    RestoredStatus, RunningAttempt, SchedulerConfig, StageCounters, StageNext, StageRun, StageState, StageStatus,
    State, Waiting,
};
