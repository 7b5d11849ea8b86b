//! Allocation traces and snapshots, and the replay engine, for gpumem.
//!
//! Reads PyTorch's allocator traces (gpumem's JSON lines, plain or gzip'd; snapshot pickles
//! from `torch.cuda.memory._dump_snapshot()`) and RAPIDS RMM's logging-adaptor CSV, detecting
//! the format from the content, and replays them through any policy on any device, to show
//! what each allocator would have reserved for the same program.
//!
//! ```no_run
//! use gpumem::{Policy, SimDevice};
//! use gpumem_trace::{read_trace, replay, ReplayOptions};
//! let trace = read_trace("resnet50_train.jsonl.gz")?;
//! let report = replay(&trace, &Policy::parse("torch")?, SimDevice::default(), &ReplayOptions::default(), &mut |_, _| {})?;
//! println!("peak reserved {} for a peak of {} live bytes", report.peak_reserved, report.peak_requested);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

// Modules depend on each other in one direction only, so that each can be read and changed
// without the ones above it: `error` and `model` (plain data) at the bottom; `read`, `write`
// and `schedule` over them; `device` (the replay's view of a device) on its own; `contents`,
// `cuda`, `oracle` and `replay` over `device`.
mod contents;
mod cuda;
mod device;
mod error;
mod model;
mod oracle;
mod read;
mod replay;
mod schedule;
mod write;

pub use cuda::CudaReplayDevice;
pub use device::ReplayDevice;
pub use error::{quote, Location, TraceError};
pub use model::{Event, Format, Trace};
pub use read::{detect, read_trace, read_trace_as, read_trace_bytes, MAX_LINE};
pub use replay::{
    replay, replay_into, replay_observed, stats_differences, ReplayError, ReplayOptions, ReplayReport, Step,
};
pub use schedule::{schedule, Op, Schedule, Skip};
pub use write::{write_jsonl, write_snapshot};
