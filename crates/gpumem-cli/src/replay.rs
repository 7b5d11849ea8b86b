//! `gpumem replay` and `gpumem summary`.

use crate::args::{DeviceChoice, ReplayArgs, SummaryArgs};
use crate::units::{gib, parse_size};
use crate::Failure;
use gpumem::{
    AllocatorConfig, ConfigError, Policy, PolicyKind, SimDevice, StreamOracle, ENV_VAR, H100_CAPACITY,
    MAX_SIM_CAPACITY,
};
use gpumem_trace::{
    read_trace, replay, replay_into, CudaReplayDevice, ReplayDevice, ReplayError, ReplayOptions,
    ReplayReport, Trace,
};
use std::io::IsTerminal;

/// Traces of more events than this show a progress bar (on a terminal, without --json).
const PROGRESS_MIN_EVENTS: usize = 200_000;

/// The policies to replay: those named on the command line (all three where none is), with
/// the options of `GPUMEM_ALLOC_CONF` where it is set, as a program run under it would
/// have them. The command line's options come after the variable's, so they win; with the
/// variable set and no `--policy`, the one policy it selects.
pub(crate) fn policies(names: &[String]) -> Result<Vec<Policy>, Failure> {
    let env = std::env::var(ENV_VAR).ok().filter(|s| !s.trim().is_empty());
    let Some(env) = env else {
        let names: Vec<String> = if names.is_empty() {
            Policy::NAMES.iter().map(|s| s.to_string()).collect()
        } else {
            names.to_vec()
        };
        return names.iter().map(|n| Policy::parse(n).map_err(Failure::input)).collect();
    };
    // the variable alone first, so that its own mistakes are reported as its
    let mut conf = AllocatorConfig::from_env().map_err(Failure::input)?;
    let bad = |e: ConfigError, n: &str| {
        Failure::Input(format!("{ENV_VAR} with --policy {}: {}", gpumem_trace::quote(n), e.0))
    };
    if names.is_empty() {
        let kind = conf
            .settle_policy(PolicyKind::DEFAULT)
            .map_err(|e| Failure::Input(format!("{ENV_VAR}: {}", e.0)))?;
        let name = Policy::kind_name(kind);
        return Ok(vec![Policy::parse(&format!("{name}:{env}")).map_err(|e| bad(e, name))?]);
    }
    names
        .iter()
        .map(|n| {
            let (name, opts) = n.split_once(':').unwrap_or((n, ""));
            let all = if opts.trim().is_empty() { env.clone() } else { format!("{env},{opts}") };
            Policy::parse(&format!("{name}:{all}")).map_err(|e| bad(e, n))
        })
        .collect()
}

pub(crate) fn capacity(arg: &Option<String>) -> Result<u64, Failure> {
    let Some(s) = arg else {
        return Ok(H100_CAPACITY);
    };
    let c = parse_size(s).map_err(Failure::Input)?;
    if c > MAX_SIM_CAPACITY {
        return Err(Failure::Input(format!(
            "bad size {}: more than 16 TiB, which no GPU comes near (the simulated device takes at most 16TiB)",
            gpumem_trace::quote(s)
        )));
    }
    Ok(c)
}

/// Where a replay runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Sim,
    Cuda,
}

/// `--device`: `auto` is the GPU where one is present, else the simulated device, said on
/// stderr (stdout may be JSON).
fn target(choice: DeviceChoice) -> Target {
    match choice {
        DeviceChoice::Sim => Target::Sim,
        DeviceChoice::Cuda => Target::Cuda,
        DeviceChoice::Auto => match CudaReplayDevice::new(0) {
            Ok(_) => Target::Cuda,
            Err(e) => {
                eprintln!("gpumem: no GPU here ({e}): replaying on the simulated device instead");
                Target::Sim
            }
        },
    }
}

/// `--verify` compares the `torch` policy with what PyTorch recorded, handing out the
/// trace's own segment addresses, which only the simulated device can do.
fn check_verify(verify: bool, policies: &[Policy], target: Target) -> Result<(), Failure> {
    if !verify {
        return Ok(());
    }
    if target == Target::Cuda {
        return Err(Failure::Input(
            "--verify needs the simulated device, which hands out the trace's own segment addresses; a real GPU cannot (drop --device cuda)".into(),
        ));
    }
    if let Some(p) = policies.iter().find(|p| p.kind != PolicyKind::Torch) {
        return Err(Failure::Input(format!(
            "--verify checks PyTorch's own algorithm against the trace, so it applies to the torch policy only, not {} (use --policy torch)",
            gpumem_trace::quote(&p.to_string())
        )));
    }
    Ok(())
}

fn progress_bar(trace: &Trace, policy: &Policy, show: bool) -> Option<indicatif::ProgressBar> {
    if !show || trace.events.len() < PROGRESS_MIN_EVENTS {
        return None;
    }
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ops")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("{} / {}", trace.name(), policy));
    Some(bar)
}

/// Replays on `device`, watched by a stream-ordering oracle when `check_streams`.
fn replay_on<D: ReplayDevice + 'static>(
    trace: &Trace,
    policy: &Policy,
    device: D,
    opts: &ReplayOptions,
    check_streams: bool,
    tick: &mut dyn FnMut(u64, u64),
) -> Result<ReplayReport, ReplayError> {
    if check_streams {
        replay(trace, policy, StreamOracle::new(device), opts, tick)
    } else {
        replay(trace, policy, device, opts, tick)
    }
}

pub(crate) fn run_replay(a: &ReplayArgs) -> Result<(), Failure> {
    let policies = policies(&a.policies)?;
    let cap = capacity(&a.capacity)?;
    let target = target(a.device);
    if target == Target::Cuda && a.capacity.is_some() {
        return Err(Failure::Input("--capacity applies to the simulated device only".into()));
    }
    check_verify(a.verify, &policies, target)?;
    if let Some(out) = &a.snapshot {
        if a.check_streams {
            return Err(Failure::Input("--check-streams does not apply with --snapshot".into()));
        }
        if a.traces.len() != 1 || policies.len() != 1 {
            return Err(Failure::Input("--snapshot needs exactly one trace and one --policy".into()));
        }
        return dump_snapshot(&a.traces[0], &policies[0], cap, target, a, out);
    }
    let opts = ReplayOptions {
        verify: a.verify,
        strict: a.strict,
        check_contents: a.check_contents,
        ..Default::default()
    };
    let show_progress = !a.json && std::io::stdout().is_terminal();
    let mut rows = Vec::new();
    let mut lost = Vec::new();
    let mut violation = None;
    let mut ooms = Vec::new();
    for path in &a.traces {
        let trace = read_trace(path)?;
        for policy in &policies {
            let bar = progress_bar(&trace, policy, show_progress);
            let mut tick = |done: u64, total: u64| {
                if let Some(b) = &bar {
                    b.set_length(total);
                    b.set_position(done);
                }
            };
            let report = match target {
                Target::Sim => {
                    replay_on(&trace, policy, SimDevice::new(cap), &opts, a.check_streams, &mut tick)
                }
                Target::Cuda => {
                    let dev = CudaReplayDevice::new(0).map_err(Failure::work)?;
                    replay_on(&trace, policy, dev, &opts, a.check_streams, &mut tick)
                }
            }
            .map_err(Failure::work)?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            if let (Some(n), Some(bad)) = (report.contents_checked, report.contents_corrupted) {
                if !a.json {
                    println!("{} / {}: {n} blocks checked, {bad} lost a stamp", report.trace, report.policy);
                }
                if bad > 0 {
                    lost.push(format!("{} / {}: {bad} of {n}", report.trace, report.policy));
                }
            }
            if let (None, Some(v)) = (&violation, &report.first_stream_violation) {
                violation = Some(format!(
                    "{} / {}: memory handed to another stream before the work on it was known done: {v}",
                    report.trace, report.policy
                ));
            }
            if report.ooms > 0 {
                ooms.push(format!("{} / {}: {}", report.trace, report.policy, report.ooms));
            }
            if a.json {
                println!("{}", serde_json::to_string(&report).expect("reports serialize"));
            } else {
                rows.push(report);
            }
        }
    }
    if !a.json {
        print_table(&rows, a.verify);
    }
    if let Some(v) = violation {
        return Err(Failure::Work(v));
    }
    if !ooms.is_empty() {
        return Err(Failure::Work(format!("allocations failed with out of memory ({})", ooms.join(", "))));
    }
    if !lost.is_empty() {
        return Err(Failure::Work(format!(
            "blocks lost their contents ({}): the allocator handed out memory twice or lost a page under a live block",
            lost.join(", ")
        )));
    }
    Ok(())
}

fn print_table(rows: &[ReplayReport], verify: bool) {
    let mut header = vec![
        "trace",
        "policy",
        "ops",
        "peak live",
        "peak reserved",
        "ratio",
        "dev allocs",
        "dev frees",
        "OOMs",
        "seconds",
        "in driver",
        "steady ns/op",
    ];
    if verify {
        header.extend(["segments", "addresses"]);
    }
    let streams = rows.iter().any(|r| r.stream_violations.is_some());
    if streams {
        header.extend(["x-stream reuse", "violations"]);
    }
    let mut table = comfy_table::Table::new();
    // No borders: only a rule under the header, as plain as a Unix tool's output, so that it
    // reads the same in a log file and greps by row. A column's right padding and the space
    // where a vertical line would be keep two spaces between columns.
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_style(comfy_table::TableComponent::HeaderLines, '-');
    table.set_style(comfy_table::TableComponent::MiddleHeaderIntersections, ' ');
    table.set_header(header);
    for r in rows {
        let mut l = vec![
            r.trace.clone(),
            r.policy.clone(),
            r.ops.to_string(),
            gib(r.peak_requested),
            gib(r.peak_reserved),
            format!("{:.3}x", r.reserved_ratio),
            r.device_allocs.to_string(),
            r.device_frees.to_string(),
            r.ooms.to_string(),
            format!("{:.4}", r.seconds),
            r.device_seconds.map_or("-".into(), |d| format!("{d:.4}")),
            format!("{:.0}", r.steady_ns_per_op),
        ];
        if verify {
            let pair = |m: Option<u64>, e: Option<u64>| match (m, e) {
                (Some(m), Some(e)) => format!("{m}/{e}"),
                _ => "-".into(),
            };
            l.push(pair(r.segments_matched, r.segments_expected));
            l.push(pair(r.allocs_matched, r.allocs_expected));
        }
        if streams {
            let bytes = |b: Option<u64>| b.map_or("-".into(), gpumem::format_size);
            l.push(bytes(r.cross_stream_reuses));
            l.push(match (r.stream_violations, r.stream_violation_count) {
                (Some(b), Some(n)) if n > 0 => format!("{} in {n}", gpumem::format_size(b)),
                (Some(_), _) => "0".into(),
                _ => "-".into(),
            });
        }
        table.add_row(l);
    }
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, 1));
        // names to the left, figures to the right
        if i >= 2 {
            column.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
    println!("{}", table.trim_fmt());
    for r in rows {
        if r.skipped > 0 {
            let why: Vec<String> = r.skipped_reasons.iter().map(|(k, v)| format!("{v} × {k}")).collect();
            println!(
                "{} / {}: skipped {} inconsistent events: {}",
                r.trace,
                r.policy,
                r.skipped,
                why.join(", ")
            );
        }
        if r.live_at_end > 0 {
            println!(
                "{} / {}: {} allocations ({}) were still live at the end of the trace",
                r.trace,
                r.policy,
                r.live_at_end,
                gib(r.live_bytes_at_end)
            );
        }
    }
}

fn dump_snapshot(
    path: &str,
    policy: &Policy,
    cap: u64,
    target: Target,
    a: &ReplayArgs,
    out: &str,
) -> Result<(), Failure> {
    let trace = read_trace(path)?;
    // create the file first: a bad path is bad input, found before the work
    let file =
        std::fs::File::create(out).map_err(|e| Failure::Input(format!("{out}: cannot create: {e}")))?;
    let opts =
        ReplayOptions { verify: a.verify, strict: a.strict, record_history: true, ..Default::default() };
    let report = match target {
        Target::Sim => replay_and_write(&trace, policy, SimDevice::new(cap), &opts, file, out)?,
        Target::Cuda => {
            let dev = CudaReplayDevice::new(0).map_err(Failure::work)?;
            replay_and_write(&trace, policy, dev, &opts, file, out)?
        }
    };
    let ooms = report.ooms;
    let label = format!("{} / {}", report.trace, report.policy);
    if a.json {
        println!("{}", serde_json::to_string(&report).expect("reports serialize"));
    } else {
        print_table(&[report], a.verify);
        println!("snapshot written to {out} (open it at pytorch.org/memory_viz)");
    }
    if ooms > 0 {
        return Err(Failure::Work(format!("allocations failed with out of memory ({label}: {ooms})")));
    }
    Ok(())
}

/// Replays on `device` and writes the allocator's state and history to `file` (named `out`).
fn replay_and_write<D: ReplayDevice + 'static>(
    trace: &Trace,
    policy: &Policy,
    device: D,
    opts: &ReplayOptions,
    file: std::fs::File,
    out: &str,
) -> Result<ReplayReport, Failure> {
    let (report, alloc) = replay_into(trace, policy, device, opts, &mut |_, _| {}).map_err(Failure::work)?;
    let failed = |e: &dyn std::fmt::Display| Failure::Work(format!("{out}: {e}"));
    let mut w = std::io::BufWriter::new(file);
    gpumem_trace::write_snapshot(&alloc.snapshot(), &alloc.history(), 0, &policy.to_string(), &mut w)
        .map_err(|e| failed(&e))?;
    std::io::Write::flush(&mut w).map_err(|e| failed(&e))?;
    Ok(report)
}

pub(crate) fn run_summary(a: &SummaryArgs) -> Result<(), Failure> {
    // the named policy (with GPUMEM_ALLOC_CONF's options), else the one the variable
    // selects, else gpumem
    let policy = match &a.policy {
        Some(p) => policies(std::slice::from_ref(p))?.remove(0),
        None if std::env::var(ENV_VAR).is_ok_and(|v| !v.trim().is_empty()) => policies(&[])?.remove(0),
        None => Policy::parse("gpumem").map_err(Failure::input)?,
    };
    let cap = capacity(&a.capacity)?;
    let trace = read_trace(&a.trace)?;
    let stop_after = if a.at_end {
        None
    } else {
        let first = replay(&trace, &policy, SimDevice::new(cap), &ReplayOptions::default(), &mut |_, _| {})
            .map_err(Failure::work)?;
        Some(first.peak_op)
    };
    let opts = ReplayOptions { stop_after, ..Default::default() };
    let (report, alloc) =
        replay_into(&trace, &policy, SimDevice::new(cap), &opts, &mut |_, _| {}).map_err(Failure::work)?;
    let when = match stop_after {
        Some(n) => format!(
            "at its peak of live bytes ({} live, after op {n} of the trace)",
            gib(report.peak_requested)
        ),
        None => "at its end".to_string(),
    };
    println!("{} replayed with policy {} on the simulated device, {when}:", trace.name(), policy);
    print!("{}", alloc.memory_summary(a.abbreviated));
    Ok(())
}
