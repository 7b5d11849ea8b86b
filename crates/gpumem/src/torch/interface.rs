//! PyTorch's algorithm as the allocator sees it: the policy interface ([`PolicyEngine`]).

use crate::config::{AllocatorConfig, PolicyKind};
use crate::device::{Device, StreamId};
use crate::error::AllocError;
use crate::policy::PolicyEngine;
use crate::report::history::History;
use crate::report::snapshot::SegmentInfo;
use crate::report::stats::DeviceStats;
use crate::torch::Engine;

impl<D: Device> PolicyEngine<D> for Engine<D> {
    fn kind(&self) -> PolicyKind {
        if self.config.expandable_segments {
            PolicyKind::TorchExpandable
        } else {
            PolicyKind::Torch
        }
    }
    fn malloc(&mut self, size: u64, stream: StreamId) -> Result<u64, AllocError> {
        Engine::malloc(self, size, stream)
    }
    fn free(&mut self, ptr: u64) -> Result<(), AllocError> {
        Engine::free(self, ptr)
    }
    fn record_stream(&mut self, ptr: u64, stream: StreamId) -> Result<(), AllocError> {
        Engine::record_stream(self, ptr, stream)
    }
    fn process_events(&mut self) -> Result<(), AllocError> {
        Engine::process_events(self)
    }
    fn empty_cache(&mut self) -> Result<(), AllocError> {
        Engine::release_cached_blocks(self)
    }
    fn stats(&self) -> &DeviceStats {
        &self.stats
    }
    fn stats_mut(&mut self) -> &mut DeviceStats {
        &mut self.stats
    }
    fn snapshot(&self) -> Vec<SegmentInfo> {
        Engine::snapshot(self)
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
}
