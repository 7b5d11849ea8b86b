//! Allocator options in PyTorch's configuration syntax, and the named policies.
//!
//! A PyTorch user's `PYTORCH_CUDA_ALLOC_CONF` carries over unchanged into `GPUMEM_ALLOC_CONF`:
//! `max_split_size_mb:128,roundup_power2_divisions:[64:8,>:4],expandable_segments:True`.
//! Unknown keys and bad values are errors that name the key, never silently ignored.

use crate::common::escape_for_message;
use std::fmt;

/// The environment variable that holds allocator options.
pub const ENV_VAR: &str = "GPUMEM_ALLOC_CONF";

/// The number of power-of-two intervals for `roundup_power2_divisions` (1 MiB .. 64 GiB).
pub const ROUNDUP_INTERVALS: usize = 16;

/// PyTorch's 20 MiB `kLargeBuffer`: the default `large_segment_size_mb` and
/// `max_non_split_rounding_mb`, and the least `max_split_size_mb` it accepts.
const LARGE_BUFFER: u64 = 20 << 20;
/// PyTorch's 2 MiB `kSmallBuffer`: `large_segment_size_mb` must be a multiple of it.
const SMALL_BUFFER: u64 = 2 << 20;

/// A malformed option string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid allocator option: {0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// The options of PyTorch's caching allocator that change what it does with device memory.
#[derive(Clone, Debug, PartialEq)]
pub struct AllocatorConfig {
    /// Blocks this large or larger are never split (`max_split_size_mb`); `u64::MAX` means
    /// no limit, PyTorch's default.
    pub max_split_size: u64,
    /// How much larger than the request an unsplittable block may be and still be used
    /// (`max_non_split_rounding_mb`, default 20 MiB).
    pub max_non_split_rounding_size: u64,
    /// Fraction of the allowed memory above which old cached blocks are freed
    /// (`garbage_collection_threshold`); 0 disables it. Needs a memory fraction.
    pub garbage_collection_threshold: f64,
    /// Divisions per power-of-two interval, from 1 MiB up (`roundup_power2_divisions`).
    pub roundup_power2_divisions: [u64; ROUNDUP_INTERVALS],
    /// Grow segments by mapping pages instead of allocating new ones (`expandable_segments`).
    pub expandable_segments: bool,
    /// The segment for requests of 1-10 MiB, and the page of expandable large segments
    /// (`large_segment_size_mb`, default 20 MiB).
    pub large_segment_size: u64,
    /// A cap on reserved memory as a fraction of the device (`per_process_memory_fraction`).
    pub per_process_memory_fraction: Option<f64>,
    /// The policy named by the gpumem-only key `policy` (`torch`, `torch-expandable`,
    /// `gpumem`), if given.
    pub policy: Option<PolicyKind>,
    /// Options of the `gpumem` policy alone.
    pub packed: PackedOptions,
    /// The keys that were set, in order.
    pub keys: Vec<String>,
    /// Keys PyTorch accepts that concern things gpumem does not manage (pinned host memory,
    /// CUDA graphs); they are checked and kept, and change nothing here.
    pub inert: Vec<(String, String)>,
    /// The option string this was parsed from.
    pub source: String,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            max_split_size: u64::MAX,
            max_non_split_rounding_size: LARGE_BUFFER,
            garbage_collection_threshold: 0.0,
            roundup_power2_divisions: [0; ROUNDUP_INTERVALS],
            expandable_segments: false,
            large_segment_size: LARGE_BUFFER,
            per_process_memory_fraction: None,
            policy: None,
            packed: PackedOptions::default(),
            keys: Vec::new(),
            inert: Vec::new(),
            source: String::new(),
        }
    }
}

/// The options that only the `gpumem` policy has (`compaction`, `periodic_plan`,
/// `recycle_slack`, `recycle_above_mb`, `compact_factor`), parsed from the same option string
/// as PyTorch's keys.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedOptions {
    /// An idle chunk more than this many times larger than a block
    /// about to land in it is unmapped first, so the block does not pin it (`compact_factor`;
    /// 0, the default, never does).
    pub compact_factor: u64,
    /// Whether the free pages of chunks that still hold live blocks are given back by moving
    /// the pages under the live blocks (`compaction`, default False: Note \[Nothing moves
    /// under a live block\] in `packed/compact.rs`). Only for programs in which no thread
    /// launches work while another allocates.
    pub compaction: bool,
    /// Whether a training loop's period, once it has repeated exactly,
    /// is planned and followed (`periodic_plan`, default True; Note \[Periodic plans\] in
    /// `packed/plan.rs`).
    pub periodic_plan: bool,
    /// Reserved memory may exceed the peak of live bytes by this
    /// fraction before idle memory is recycled or compacted (`recycle_slack`, default 0: only
    /// the peak reserved so far bounds it). Trades memory for fewer device calls.
    pub recycle_slack: f64,
    /// Reserved memory below which idle memory is never recycled nor
    /// chunks compacted for growth (`recycle_above_mb`, default 0). For a program that knows
    /// the memory it may take: below this much the policy maps fresh pages as a caching
    /// allocator would, and gathers only beyond it. It trades memory for device calls.
    pub recycle_above: u64,
}

impl Default for PackedOptions {
    fn default() -> Self {
        PackedOptions {
            compact_factor: 0,
            compaction: false,
            periodic_plan: true,
            recycle_slack: 0.0,
            recycle_above: 0,
        }
    }
}

fn tokenize(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            ',' | ':' | '[' | ']' => {
                if !cur.trim().is_empty() {
                    out.push(cur.trim().to_string());
                }
                cur.clear();
                out.push(c.to_string());
            }
            c if c.is_whitespace() => {}
            c => cur.push(c),
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

struct Tokens {
    t: Vec<String>,
    i: usize,
}

impl Tokens {
    fn next(&mut self, what: &str) -> Result<String, ConfigError> {
        let tok = self.t.get(self.i).cloned();
        self.i += 1;
        tok.ok_or_else(|| ConfigError(format!("expected {what} at the end")))
    }
    fn expect(&mut self, sep: &str, key: &str) -> Result<(), ConfigError> {
        let tok = self.next(sep)?;
        if tok != sep {
            return err(format!("expected '{sep}' after '{}', found '{}'", shown(key), shown(&tok)));
        }
        Ok(())
    }
    fn peek(&self) -> Option<&str> {
        self.t.get(self.i).map(|s| s.as_str())
    }
}

/// The largest size option, in MiB: 1 EiB, as for a request ([`crate::AllocError::TooLarge`]).
/// No device comes near it, and sums and products of sizes under it cannot overflow.
const MAX_MIB: u64 = 1 << 40;

/// The largest `compact_factor`: beyond it no idle chunk is ever large enough to split.
const MAX_COMPACT_FACTOR: u64 = 1 << 16;

/// `v` MiB in bytes, for option `key`; an error where it exceeds [`MAX_MIB`].
fn mib(key: &str, v: u64) -> Result<u64, ConfigError> {
    if v > MAX_MIB {
        return err(format!("{key} is {v} MiB, more than 1 EiB (2^40 MiB): give a size a device can hold"));
    }
    Ok(v << 20)
}

/// An option value as given, for a message: escaped and cut, so that a hostile
/// `GPUMEM_ALLOC_CONF` cannot reach the terminal raw.
fn shown(v: &str) -> String {
    escape_for_message(v, 80)
}

fn parse_u64(key: &str, v: &str) -> Result<u64, ConfigError> {
    v.parse::<u64>().or_else(|_| err(format!("{key} needs a non-negative integer, not '{}'", shown(v))))
}

fn parse_bool(key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "True" => Ok(true),
        "False" => Ok(false),
        _ => err(format!("{key} must be True or False (exactly), not '{}'", shown(v))),
    }
}

fn parse_f64(key: &str, v: &str) -> Result<f64, ConfigError> {
    v.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite())
        .ok_or_else(|| ConfigError(format!("{key} needs a number, not '{}'", shown(v))))
}

fn check_divisions(v: u64) -> Result<u64, ConfigError> {
    if v != 0 && !v.is_power_of_two() {
        return err(format!("roundup_power2_divisions: the divisions must be a power of 2 (or 0), not {v}"));
    }
    Ok(v)
}

impl AllocatorConfig {
    /// Parses options in PyTorch's syntax, such as
    /// `max_split_size_mb:128,roundup_power2_divisions:[256:4,>:8]`.
    ///
    /// ```
    /// let c = gpumem::AllocatorConfig::parse("max_split_size_mb:128,expandable_segments:True").unwrap();
    /// assert_eq!(c.max_split_size, 128 << 20);
    /// assert!(c.expandable_segments);
    /// assert!(gpumem::AllocatorConfig::parse("max_split_mb:128").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<AllocatorConfig, ConfigError> {
        let mut c = AllocatorConfig { source: s.to_string(), ..Default::default() };
        let mut t = Tokens { t: tokenize(s), i: 0 };
        while let Some(key) = t.peek().map(str::to_string) {
            t.i += 1;
            if key == "," {
                continue;
            }
            t.expect(":", &key)?;
            c.apply(&key, &mut t)?;
            c.keys.push(key.clone());
            match t.peek() {
                None | Some(",") => {}
                Some(other) => return err(format!("unexpected '{}' after the value of {key}", shown(other))),
            }
        }
        Ok(c)
    }

    /// Reads options from `GPUMEM_ALLOC_CONF` (empty when unset).
    pub fn from_env() -> Result<AllocatorConfig, ConfigError> {
        match std::env::var(ENV_VAR) {
            Ok(s) => AllocatorConfig::parse(&s).map_err(|e| ConfigError(format!("{ENV_VAR}: {}", e.0))),
            Err(_) => Ok(AllocatorConfig::default()),
        }
    }

    fn apply(&mut self, key: &str, t: &mut Tokens) -> Result<(), ConfigError> {
        const MB: u64 = 1 << 20;
        match key {
            "max_split_size_mb" => {
                let v = parse_u64(key, &t.next(key)?)?;
                if v < LARGE_BUFFER / MB {
                    return err(format!("max_split_size_mb too small, must be >= {}", LARGE_BUFFER / MB));
                }
                self.max_split_size = mib(key, v)?;
            }
            "max_non_split_rounding_mb" => {
                let v = parse_u64(key, &t.next(key)?)?;
                if v < LARGE_BUFFER / MB {
                    return err(format!("max_non_split_rounding_mb too small, must be >= {}", LARGE_BUFFER / MB));
                }
                self.max_non_split_rounding_size = mib(key, v)?;
            }
            "garbage_collection_threshold" => {
                let v = parse_f64(key, &t.next(key)?)?;
                if !(v > 0.0 && v < 1.0) {
                    return err("garbage_collection_threshold must be between 0.0 and 1.0 (exclusive)");
                }
                self.garbage_collection_threshold = v;
            }
            "roundup_power2_divisions" => self.parse_divisions(t)?,
            "compact_factor" => {
                let v = parse_u64(key, &t.next(key)?)?;
                if v > MAX_COMPACT_FACTOR {
                    return err(format!("compact_factor must be at most {MAX_COMPACT_FACTOR} (0 turns it off), not {v}"));
                }
                self.packed.compact_factor = v;
            }
            "compaction" => self.packed.compaction = parse_bool(key, &t.next(key)?)?,
            "periodic_plan" => self.packed.periodic_plan = parse_bool(key, &t.next(key)?)?,
            "recycle_slack" => {
                let v = parse_f64(key, &t.next(key)?)?;
                if !(0.0..1.0).contains(&v) {
                    return err("recycle_slack must be at least 0.0 and below 1.0 (0.01: 1% above the live peak)");
                }
                self.packed.recycle_slack = v;
            }
            "recycle_above_mb" => self.packed.recycle_above = mib(key, parse_u64(key, &t.next(key)?)?)?,
            "policy" => {
                let v = t.next(key)?;
                self.policy = Some(kind_from_name(&v)?);
            }
            "expandable_segments" => self.expandable_segments = parse_bool(key, &t.next(key)?)?,
            "large_segment_size_mb" => {
                let v = parse_u64(key, &t.next(key)?)?;
                let bytes = mib(key, v)?;
                if v == 0 || !bytes.is_multiple_of(SMALL_BUFFER) {
                    return err("large_segment_size_mb must be a positive multiple of 2");
                }
                self.large_segment_size = bytes;
            }
            "per_process_memory_fraction" => {
                let v = parse_f64(key, &t.next(key)?)?;
                if !(0.0..=1.0).contains(&v) {
                    return err("per_process_memory_fraction must be between 0.0 and 1.0");
                }
                self.per_process_memory_fraction = if v == 1.0 { None } else { Some(v) };
            }
            "backend" => {
                let v = t.next(key)?;
                match v.as_str() {
                    "native" => {}
                    "cudaMallocAsync" => return err(
                        "backend:cudaMallocAsync is the driver's pool, not a caching allocator gpumem replaces; drop it, or try the gpumem policy",
                    ),
                    _ => return err(format!("backend must be native or cudaMallocAsync, not '{}'", shown(&v))),
                }
            }
            "release_lock_on_cudamalloc"
            | "pinned_use_cuda_host_register"
            | "pinned_use_background_threads"
            | "graph_capture_record_stream_reuse"
            | "throw_on_cudamalloc_oom"
            | "pinned_free_catch_all" => {
                let v = t.next(key)?;
                parse_bool(key, &v)?;
                self.inert.push((key.to_string(), v));
            }
            "pinned_num_register_threads" => {
                let v = t.next(key)?;
                let n = parse_u64(key, &v)?;
                if !n.is_power_of_two() || n > 128 {
                    return err("pinned_num_register_threads must be a power of 2 up to 128");
                }
                self.inert.push((key.to_string(), v));
            }
            "pinned_reserve_segment_size_mb" | "expandable_segments_reserve" => {
                let v = t.next(key)?;
                parse_u64(key, &v)?;
                self.inert.push((key.to_string(), v));
            }
            _ => {
                return err(format!(
                    "unrecognized option '{}' (known: max_split_size_mb, max_non_split_rounding_mb, \
                     garbage_collection_threshold, roundup_power2_divisions, expandable_segments, \
                     large_segment_size_mb, per_process_memory_fraction, backend, policy, compact_factor, compaction, periodic_plan, recycle_slack, recycle_above_mb, and PyTorch's pinned_* keys)",
                    shown(key)
                ))
            }
        }
        Ok(())
    }

    fn parse_divisions(&mut self, t: &mut Tokens) -> Result<(), ConfigError> {
        const KEY: &str = "roundup_power2_divisions";
        let first = t.next(KEY)?;
        if first != "[" {
            let v = check_divisions(parse_u64(KEY, &first)?)?;
            self.roundup_power2_divisions = [v; ROUNDUP_INTERVALS];
            return Ok(());
        }
        let mut last_index = 0usize;
        let mut first_value = true;
        loop {
            let interval = t.next("an interval")?;
            if interval == "]" {
                break;
            }
            t.expect(":", &interval)?;
            let v = check_divisions(parse_u64(KEY, &t.next(KEY)?)?)?;
            if interval == ">" {
                for d in &mut self.roundup_power2_divisions[(last_index + 1).min(ROUNDUP_INTERVALS)..] {
                    *d = v;
                }
            } else {
                let mb = parse_u64(KEY, &interval)?;
                if !mb.is_power_of_two() {
                    return err(format!("{KEY}: the intervals must be powers of 2 (in MB), not {mb}"));
                }
                let index = (mb.trailing_zeros() as usize).min(ROUNDUP_INTERVALS - 1);
                if first_value {
                    for d in &mut self.roundup_power2_divisions[..index] {
                        *d = v;
                    }
                    first_value = false;
                }
                self.roundup_power2_divisions[index] = v;
                last_index = index;
            }
            match t.next("']'")?.as_str() {
                "," => continue,
                "]" => break,
                other => return err(format!("{KEY}: expected ',' or ']', found '{}'", shown(other))),
            }
        }
        Ok(())
    }

    /// The `roundup_power2_divisions` that apply to a request of `size` bytes (one interval
    /// per power of two from 1 MiB).
    pub fn roundup_power2_divisions_for(&self, size: u64) -> u64 {
        let log = 63 - size.max(1).leading_zeros() as usize;
        let index = log.saturating_sub(20).min(ROUNDUP_INTERVALS - 1);
        self.roundup_power2_divisions[index]
    }

    /// `max_split_size` as PyTorch's stats report it: -1 when unlimited.
    pub(crate) fn max_split_size_stat(&self) -> i64 {
        if self.max_split_size == u64::MAX {
            -1
        } else {
            self.max_split_size as i64
        }
    }
}

/// The allocation strategies gpumem offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// PyTorch 2.x's default caching allocator, reproduced exactly.
    Torch,
    /// PyTorch's allocator with `expandable_segments:True`.
    TorchExpandable,
    /// gpumem's own: byte-granular packing with page recycling (see `packed/mod.rs`).
    Gpumem,
}

impl PolicyKind {
    /// The policy used where none is named: by [`crate::Allocator::new`], the global API
    /// and the `gpumem` command alike.
    pub const DEFAULT: PolicyKind = PolicyKind::Gpumem;
}

/// The policy called `name` (one of [`Policy::NAMES`]).
fn kind_from_name(name: &str) -> Result<PolicyKind, ConfigError> {
    [PolicyKind::Torch, PolicyKind::TorchExpandable, PolicyKind::Gpumem]
        .into_iter()
        .find(|&k| Policy::kind_name(k) == name)
        .map_or_else(
            || err(format!("unknown policy '{}' (known: {})", shown(name), Policy::NAMES.join(", "))),
            Ok,
        )
}

/// Options that only the `gpumem` policy has.
const GPUMEM_ONLY: &[&str] =
    &["compact_factor", "compaction", "periodic_plan", "recycle_slack", "recycle_above_mb"];

/// Options that only PyTorch's algorithm has.
const TORCH_ONLY: &[&str] = &[
    "max_split_size_mb",
    "max_non_split_rounding_mb",
    "garbage_collection_threshold",
    "expandable_segments",
    "large_segment_size_mb",
];

impl AllocatorConfig {
    /// The policy these options ask for: the `policy` key if given, else `torch-expandable`
    /// with `expandable_segments:True`, else `default`; except that options only PyTorch's
    /// algorithm has (such as `max_split_size_mb`) select `torch` over a `gpumem` default,
    /// so that a PyTorch user's settings keep their meaning.
    pub fn policy_or(&self, default: PolicyKind) -> PolicyKind {
        if let Some(p) = self.policy {
            return p;
        }
        if self.expandable_segments {
            return PolicyKind::TorchExpandable;
        }
        if default == PolicyKind::Gpumem && self.keys.iter().any(|k| TORCH_ONLY.contains(&k.as_str())) {
            return PolicyKind::Torch;
        }
        default
    }

    /// Settles the policy: the one these options ask for, with `default` as in
    /// [`AllocatorConfig::policy_or`], checked against the options and recorded in `policy`.
    pub fn settle_policy(&mut self, default: PolicyKind) -> Result<PolicyKind, ConfigError> {
        let kind = self.policy_or(default);
        self.check_for(kind)?;
        self.policy = Some(kind);
        Ok(kind)
    }

    /// Checks that every option applies to `kind`.
    pub fn check_for(&self, kind: PolicyKind) -> Result<(), ConfigError> {
        if let Some(k) = self.keys.iter().find(|k| GPUMEM_ONLY.contains(&k.as_str())) {
            if kind != PolicyKind::Gpumem {
                return err(format!("{k} applies to the gpumem policy only"));
            }
        }
        if kind == PolicyKind::Gpumem {
            if let Some(k) = self.keys.iter().find(|k| TORCH_ONLY.contains(&k.as_str())) {
                return err(format!(
                    "{k} applies to PyTorch's algorithm (policy torch or torch-expandable), not to the gpumem policy, which never splits segments; remove it or choose policy:torch"
                ));
            }
        }
        Ok(())
    }
}

/// A named policy with its options, as written on the command line: `torch`,
/// `torch-expandable`, or either followed by `:` and options (`torch:max_split_size_mb:128`).
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Which algorithm.
    pub kind: PolicyKind,
    /// Its options.
    pub config: AllocatorConfig,
}

impl Policy {
    /// The names of all policies, in the order a comparison lists them.
    pub const NAMES: &'static [&'static str] = &["torch", "torch-expandable", "gpumem"];

    /// Parses `NAME[:OPTIONS]`.
    ///
    /// ```
    /// let p: gpumem::Policy = "torch:max_split_size_mb:128".parse().unwrap();
    /// assert_eq!(p.kind, gpumem::PolicyKind::Torch);
    /// assert_eq!(p.config.max_split_size, 128 << 20);
    /// ```
    pub fn parse(s: &str) -> Result<Policy, ConfigError> {
        let (name, opts) = s.split_once(':').unwrap_or((s, ""));
        let mut config = AllocatorConfig::parse(opts)?;
        let kind = kind_from_name(name.trim())?;
        if kind == PolicyKind::TorchExpandable {
            config.expandable_segments = true;
        }
        if let Some(p) = config.policy.filter(|&p| p != kind) {
            return err(format!(
                "the policy is named twice: '{}' and policy:{}",
                shown(name),
                Policy::kind_name(p)
            ));
        }
        config.check_for(kind)?;
        let kind = if kind == PolicyKind::Torch && config.expandable_segments {
            PolicyKind::TorchExpandable
        } else {
            kind
        };
        config.policy = Some(kind);
        Ok(Policy { kind, config })
    }

    /// The policy's name (`torch`, `torch-expandable`, `gpumem`).
    pub fn name(&self) -> &'static str {
        Policy::kind_name(self.kind)
    }

    /// The name of a policy kind.
    pub fn kind_name(kind: PolicyKind) -> &'static str {
        match kind {
            PolicyKind::Torch => "torch",
            PolicyKind::TorchExpandable => "torch-expandable",
            PolicyKind::Gpumem => "gpumem",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::parse(s)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let src = self.config.source.trim();
        if src.is_empty() {
            f.write_str(self.name())
        } else {
            write!(f, "{}:{}", self.name(), src)
        }
    }
}
