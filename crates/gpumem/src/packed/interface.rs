//! The gpumem policy as the allocator sees it: the policy interface ([`PolicyEngine`]).

use crate::config::{AllocatorConfig, PolicyKind};
use crate::device::{Device, StreamId};
use crate::error::AllocError;
use crate::packed::{Packed, Waited};
use crate::policy::PolicyEngine;
use crate::report::history::History;
use crate::report::snapshot::SegmentInfo;
use crate::report::stats::DeviceStats;

impl<D: Device> PolicyEngine<D> for Packed<D> {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Gpumem
    }
    fn malloc(&mut self, size: u64, stream: StreamId) -> Result<u64, AllocError> {
        Packed::malloc(self, size, stream)
    }
    fn free(&mut self, ptr: u64) -> Result<(), AllocError> {
        Packed::free(self, ptr)
    }
    fn record_stream(&mut self, ptr: u64, stream: StreamId) -> Result<(), AllocError> {
        Packed::record_stream(self, ptr, stream)
    }
    fn process_events(&mut self) -> Result<(), AllocError> {
        Packed::process_events(self)
    }
    fn empty_cache(&mut self) -> Result<(), AllocError> {
        Packed::empty_cache(self)
    }
    fn stats(&self) -> &DeviceStats {
        &self.stats
    }
    fn stats_mut(&mut self) -> &mut DeviceStats {
        &mut self.stats
    }
    fn snapshot(&self) -> Vec<SegmentInfo> {
        Packed::snapshot(self)
    }
    fn history(&mut self) -> &mut History {
        &mut self.history
    }
    fn config(&self) -> &AllocatorConfig {
        &self.config
    }
    fn device(&self) -> &D {
        &self.device
    }
    fn device_total(&self) -> u64 {
        self.device_total
    }
    fn memory_cap(&self) -> Option<u64> {
        self.allowed_memory_maximum
    }
    fn set_memory_cap(&mut self, cap: Option<u64>) {
        self.allowed_memory_maximum = cap;
    }
    fn begin_call(&mut self) {
        // a new call: the program may have launched work since the last one (Note [One wait
        // per call] in `packed/mod.rs`)
        self.waited = Waited::Nothing;
    }
    fn check_invariants(&self) -> Result<(), String> {
        self.check_chunks()
    }
}
