//! Writing traces and snapshots: JSON lines that `read` reads back, and snapshot pickles that
//! PyTorch's own memory viewers open.

mod jsonl;
mod snapshot;

pub use jsonl::write_jsonl;
pub use snapshot::write_snapshot;
