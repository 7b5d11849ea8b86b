//! Command-line arguments.

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "gpumem",
    version,
    about = "A GPU memory manager: PyTorch's caching allocator, and a better one"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// The PyTorch "how to clear GPU memory" walk-through, step by step
    Demo(DemoArgs),
    /// Replay allocation traces through allocator policies on a simulated (or real) GPU
    Replay(ReplayArgs),
    /// Print memory_summary() at the trace's peak
    Summary(SummaryArgs),
    /// The GPUs, the driver's free and used memory, and each process's use
    Info(InfoArgs),
    /// Cache-hit cost per policy, throughput across threads, and device-call costs on a GPU
    Bench(BenchArgs),
    /// The blocks still live at the end of a trace (or at a point in it), by allocation site
    Leaks(LeaksArgs),
    /// One self-contained HTML report: memory over time under each policy, the peak's
    /// segments and blocks, the sites that hold the most, memory_summary()
    Report(ReportArgs),
}

#[derive(Args)]
pub(crate) struct LeaksArgs {
    /// A trace or a PyTorch snapshot pickle (with stacks, its sites are named by them)
    pub trace: String,
    /// Just after this event (numbered from 0 in the trace's allocator events, as the
    /// report shows them) instead of at the end
    #[arg(long, value_name = "EVENT", conflicts_with = "time")]
    pub at: Option<u64>,
    /// Just after this time, in microseconds from the trace's first event
    #[arg(long, value_name = "T_US")]
    pub time: Option<u64>,
    /// One JSON object: the sites with count, bytes, frames and blocks
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub(crate) struct ReportArgs {
    /// Trace files (as for replay)
    #[arg(required = true)]
    pub traces: Vec<String>,
    /// Policy to compare, repeatable (as for replay). Default: all three
    #[arg(long = "policy", short = 'p')]
    pub policies: Vec<String>,
    /// Capacity of the simulated device (default: an H100's)
    #[arg(long)]
    pub capacity: Option<String>,
    /// The HTML file to write
    #[arg(long, short = 'o', value_name = "FILE.html")]
    pub output: String,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DeviceChoice {
    /// The GPU if one is present, else the simulated device
    Auto,
    /// The real GPU through the CUDA driver
    Cuda,
    /// The simulated GPU
    Sim,
}

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Which device to run on
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
}

#[derive(Args)]
pub(crate) struct ReplayArgs {
    /// Trace files: JSON lines (plain or gzip'd), PyTorch snapshot pickles, or RMM log CSV
    #[arg(required = true)]
    pub traces: Vec<String>,
    /// Policy to replay with, repeatable: torch, torch-expandable or gpumem, optionally with
    /// options (torch:max_split_size_mb:128). Default: all three
    #[arg(long = "policy", short = 'p')]
    pub policies: Vec<String>,
    /// Device to replay on
    #[arg(long, value_enum, default_value = "sim")]
    pub device: DeviceChoice,
    /// Capacity of the simulated device: 80GiB, 81559MiB, or bytes (default: an H100's)
    #[arg(long)]
    pub capacity: Option<String>,
    /// One JSON object per line, per (trace, policy)
    #[arg(long)]
    pub json: bool,
    /// Check the torch policy against the trace's own segment allocations and addresses
    #[arg(long)]
    pub verify: bool,
    /// Stop at the first inconsistent event (exit 1)
    #[arg(long)]
    pub strict: bool,
    /// Stamp every block and check its stamps when it is freed; exit 1 if any block lost one
    /// (memory handed out twice, or a page lost). On the GPU it is slow: timings mean nothing
    #[arg(long)]
    pub check_contents: bool,
    /// Watch the replay with a stream-ordering oracle: report bytes freed on one stream and
    /// handed to another, with (cross_stream_reuses) and without (stream_violations) a
    /// completed wait in between; exit 1 on any violation
    #[arg(long)]
    pub check_streams: bool,
    /// Write the allocator's state at the end and its whole history as a PyTorch snapshot
    /// pickle (open it with pytorch.org/memory_viz); one trace and one policy only
    #[arg(long, value_name = "FILE")]
    pub snapshot: Option<String>,
}

#[derive(Args)]
pub(crate) struct SummaryArgs {
    /// The trace file
    pub trace: String,
    /// Policy, optionally with options (default: gpumem, or the one GPUMEM_ALLOC_CONF selects)
    #[arg(long, short = 'p')]
    pub policy: Option<String>,
    /// Capacity of the simulated device
    #[arg(long)]
    pub capacity: Option<String>,
    /// Print the summary at the end of the trace instead of at its peak
    #[arg(long)]
    pub at_end: bool,
    /// Leave out the per-pool rows
    #[arg(long)]
    pub abbreviated: bool,
}

#[derive(Args)]
pub(crate) struct InfoArgs {
    /// One JSON object
    #[arg(long)]
    pub json: bool,
}

/// The most threads `bench` runs: each takes a stream (on a GPU, a real one) and a share of
/// the cores; beyond this a count is a typo, not a measurement.
pub(crate) const MAX_THREADS: usize = 256;

fn threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
        _ => Err(format!("expected a thread count from 1 to {MAX_THREADS}")),
    }
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Device to measure on
    #[arg(long, value_enum, default_value = "sim")]
    pub device: DeviceChoice,
    /// Up to this many threads (powers of two), 1 to 256
    #[arg(long, default_value_t = 8, value_parser = threads)]
    pub threads: usize,
    /// Policy to measure, repeatable, optionally with options (default: all three)
    #[arg(long = "policy", short = 'p')]
    pub policies: Vec<String>,
    /// Only the allocator's figures: skip the timing of the driver's own calls on a GPU
    #[arg(long)]
    pub no_device_calls: bool,
    /// Only issue 20's figures: the busy 1 MiB hit pair, and one thread against all of them
    #[arg(long)]
    pub quick: bool,
    /// One JSON object per line
    #[arg(long)]
    pub json: bool,
}
