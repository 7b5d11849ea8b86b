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

mod contents;
mod cuda;
mod dump;
mod error;
mod jsonl;
mod pickle;
mod plan;
mod replay;
mod rmm;
mod trace;

pub use cuda::CudaReplayDevice;
pub use dump::write_snapshot;
pub use error::{Location, TraceError};
pub use jsonl::write_jsonl;
pub use plan::{plan, Op, Plan, Skip};
pub use replay::{
    replay, replay_into, stats_differences, ReplayDevice, ReplayError, ReplayOptions, ReplayReport,
};
pub use trace::{detect, read_trace, read_trace_bytes, Event, Format, Trace};
