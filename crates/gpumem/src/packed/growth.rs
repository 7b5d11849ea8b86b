//! Buffers grown by copying: recognising a KV cache that `torch.cat` makes one token longer at
//! every step, so that its blocks can be sized to reuse each other's pages.
//!
//! Note [Buffers grown by copying]
//! --------------------------------
//! Autoregressive decoding with a KV cache in the style of Hugging Face's `DynamicCache` grows
//! each layer's keys and values by `torch.cat` at every token: a new block a few KiB larger is
//! allocated, the old one copied into it and freed right after. Placed at byte granularity,
//! the new block never fits the hole the old one leaves (13,600 KiB holes, 13,616 KiB
//! requests), so at every token each cache buffer needs fresh pages and its old pages must be
//! gathered back: recycling and compaction, at 1.014× the live bytes, cost 2,211 device calls
//! on the decoding trace (869 in its second half) against 486 when reserved memory was allowed
//! to creep up to 1.056×. A block that continues such a chain is therefore rounded up to whole
//! pages (and Note [Blocks of whole pages] starts it on a page): the hole the previous token's
//! block leaves then holds the next token's, until the size crosses a page. Decoding: 1.0021×
//! with 232 device calls (63 in the second half).
//!
//! A chain is recognised from the requests alone, and only on evidence: a request of at least
//! `GROW_MIN` bytes is a *growth* of a live block at most 1/256 smaller if that block is freed
//! before four more such requests; a request is rounded only if it exceeds a block recorded as
//! a growth by exactly that growth's own step (the cache gains the same number of bytes at
//! every token). Blocks of a mixture of experts, whose sizes differ by a few tokens from
//! expert to expert, looked like growths under a looser rule (any smaller block within 1/32
//! freed soon after: 1.0088× → 1.0177×); with this one no other recorded trace moves by more
//! than 0.0001.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Requests smaller than this are never rounded (a page is a large part of them).
pub(crate) const GROW_MIN: u64 = 4 << 20;
/// A growth adds at most 1/`GROW_STEP_DIV` of the block.
const GROW_STEP_DIV: u64 = 256;
/// The predecessor must be freed before this many more requests of `GROW_MIN` or more.
const FREED_WITHIN: u64 = 4;
/// A recorded growth is forgotten after this many requests of `GROW_MIN` or more.
const REMEMBER: u64 = 4096;
/// At most this many growths are remembered (one per cache buffer of a model).
const MAX_GROWTHS: usize = 256;

/// What the policy has seen of large requests, to recognise chains of growth by copying.
#[derive(Default)]
pub(crate) struct Growth {
    /// Live blocks of `GROW_MIN` or more, as (requested size, address).
    live: BTreeSet<(u64, u64)>,
    /// Possible growths not yet confirmed: (the smaller block's address, the new request's
    /// size, its step, the count of large requests then).
    watch: VecDeque<(u64, u64, u64, u64)>,
    /// Confirmed growths by the new block's size: (its step, the count of large requests).
    grown: BTreeMap<u64, (u64, u64)>,
    /// Large requests so far.
    requests: u64,
}

impl Growth {
    /// Called for each request of `orig` bytes; says whether it continues a chain of growth
    /// by copying (and should take whole pages).
    pub(crate) fn on_request(&mut self, orig: u64) -> bool {
        if orig < GROW_MIN {
            return false;
        }
        self.requests += 1;
        let n = self.requests;
        let near = orig - orig / GROW_STEP_DIV;
        let continues =
            self.grown.range(near..orig).any(|(&s, &(step, at))| s + step == orig && n - at <= REMEMBER);
        if let Some(&(smaller, addr)) = self.live.range((near, 0)..(orig, 0)).next_back() {
            self.watch.push_back((addr, orig, orig - smaller, n));
            if self.watch.len() > 16 {
                self.watch.pop_front();
            }
        }
        continues
    }

    /// A block of `orig` requested bytes now lives at `addr`.
    pub(crate) fn on_install(&mut self, orig: u64, addr: u64) {
        if orig >= GROW_MIN {
            self.live.insert((orig, addr));
        }
    }

    /// The program freed the block of `orig` requested bytes at `addr`.
    pub(crate) fn on_free(&mut self, orig: u64, addr: u64) {
        if orig < GROW_MIN {
            return;
        }
        self.live.remove(&(orig, addr));
        let n = self.requests;
        if let Some(i) = self.watch.iter().position(|w| w.0 == addr && n - w.3 <= FREED_WITHIN) {
            let (_, size, step, _) = self.watch.remove(i).unwrap();
            self.grown.insert(size, (step, n));
            if self.grown.len() > MAX_GROWTHS {
                let oldest = self.grown.iter().min_by_key(|e| (e.1).1).map(|e| *e.0).unwrap();
                self.grown.remove(&oldest);
            }
        }
    }
}
