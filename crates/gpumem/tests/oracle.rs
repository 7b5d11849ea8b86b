//! The stream-ordering oracle on its own: driven by hand, with no allocator, it must catch a
//! planted unsynchronized reuse and accept the same reuse once a wait proves it safe.

use gpumem::{Device, SimDevice, StreamId, StreamOracle, StreamReport, StreamViolation};

const A: StreamId = StreamId(1);
const B: StreamId = StreamId(2);
const C: StreamId = StreamId(3);
const P: u64 = 0x1000_0000;
const N: u64 = 4096;

/// An oracle over a fresh simulated device, with a block of `N` bytes at `P` on stream A
/// already freed (and `record_stream`'d to `uses` before that).
fn freed_on_a(uses: &[StreamId]) -> StreamOracle<SimDevice> {
    let o = StreamOracle::new(SimDevice::new(1 << 30));
    o.note_malloc(P, N, A);
    for &s in uses {
        o.note_record_stream(P, s);
    }
    o.note_free(P);
    o
}

fn clean(cross: u64) -> StreamReport {
    StreamReport { cross_stream_reuses: cross, ..Default::default() }
}

#[test]
fn a_reuse_on_another_stream_with_no_wait_is_a_violation() {
    let o = freed_on_a(&[]);
    o.note_malloc(P, N, B);
    let r = o.report();
    assert_eq!(r.stream_violations, N);
    assert_eq!(r.stream_violation_count, 1);
    assert_eq!(r.cross_stream_reuses, 0);
    let v = r.first_violation.expect("described");
    let want = StreamViolation {
        call: 3,
        addr: P,
        size: N,
        freed_on: A,
        reused_on: B,
        unfinished: A,
        unmapped: false,
    };
    assert_eq!(v, want);
    let text = v.to_string();
    assert!(text.contains("call 3") && text.contains("0x10000000") && text.contains("stream 0x2"), "{text}");
}

#[test]
fn a_completed_event_recorded_after_the_free_makes_it_a_synchronized_reuse() {
    let o = freed_on_a(&[]);
    let e = o.create_event().unwrap();
    o.record_event(e, A).unwrap();
    o.device().complete_event(e);
    // completed on the device, but not yet observed: the allocator may not rely on it
    o.note_malloc(P, N / 2, B);
    assert_eq!(o.report().stream_violations, N / 2);
    assert!(o.query_event(e).unwrap());
    o.note_malloc(P + N / 2, N / 2, C);
    let r = o.report();
    assert_eq!((r.stream_violations, r.cross_stream_reuses, r.stream_violation_count), (N / 2, N / 2, 1));
}

#[test]
fn an_event_recorded_before_the_free_proves_nothing() {
    let o = StreamOracle::new(SimDevice::new(1 << 30));
    let e = o.create_event().unwrap();
    o.note_malloc(P, N, A);
    o.record_event(e, A).unwrap();
    o.synchronize_event(e).unwrap();
    o.note_free(P);
    o.note_malloc(P, N, B);
    assert_eq!(o.report().stream_violations, N);
    // a sync after the free does prove it, for the next reuse
    let o = freed_on_a(&[]);
    o.synchronize_stream(A).unwrap();
    o.note_malloc(P, N, B);
    assert_eq!(o.report(), clean(N));
}

#[test]
fn a_sync_of_the_wrong_stream_proves_nothing_and_the_device_sync_proves_all() {
    let o = freed_on_a(&[C]);
    o.synchronize_stream(B).unwrap();
    o.synchronize_stream(C).unwrap();
    o.note_malloc(P, 16, B);
    assert_eq!(o.report().first_violation.map(|v| v.unfinished), Some(A));
    o.synchronize_device().unwrap();
    o.note_malloc(P + 16, 16, B);
    assert_eq!(o.report().cross_stream_reuses, 16);
    // freeing a segment (cuMemFree) synchronizes the device too
    let o = freed_on_a(&[C]);
    let seg = o.malloc(2 << 20).unwrap();
    o.free(seg).unwrap();
    o.note_malloc(P, N, B);
    assert_eq!(o.report(), clean(N));
}

#[test]
fn the_same_stream_waits_only_for_its_record_stream_uses() {
    let o = freed_on_a(&[]);
    o.note_malloc(P, N, A);
    assert_eq!(o.report(), clean(0), "stream order needs no wait and is no cross-stream reuse");
    // used on C too: reusing on A must wait for C
    let o = freed_on_a(&[C]);
    o.note_malloc(P, N, A);
    let v = o.report().first_violation.expect("C was not done");
    assert_eq!((v.freed_on, v.reused_on, v.unfinished), (A, A, C));
    let o = freed_on_a(&[C]);
    let e = o.create_event().unwrap();
    o.record_event(e, C).unwrap();
    o.synchronize_event(e).unwrap();
    o.note_malloc(P, N, A);
    assert_eq!(o.report(), clean(N));
    // handed to C itself: C's own work is in order, but A's is not known done
    let o = freed_on_a(&[C]);
    o.note_malloc(P, N, C);
    assert_eq!(o.report().first_violation.map(|v| v.unfinished), Some(A));
}

#[test]
fn only_the_bytes_handed_out_count_and_each_only_once() {
    let o = freed_on_a(&[]);
    // straddles the freed block: only the overlap counts
    o.note_malloc(P - 100, 200, B);
    assert_eq!(o.report().stream_violations, 100);
    o.note_free(P - 100);
    o.synchronize_device().unwrap();
    o.note_malloc(P - 100, N + 100, C);
    let r = o.report();
    // 200 bytes freed by B, N - 100 still from A's free: all known done now
    assert_eq!((r.cross_stream_reuses, r.stream_violations, r.stream_violation_count), (N + 100, 100, 1));
    // the first violation stays the first
    assert_eq!(r.first_violation.map(|v| (v.addr, v.size, v.call)), Some((P, 100, 3)));
    // unknown pointers and zero sizes are ignored
    o.note_free(12345);
    o.note_record_stream(12345, A);
    o.note_malloc(0, 10, A);
    o.note_malloc(P, 0, A);
    assert_eq!(o.report(), r);
}

#[test]
fn a_reused_event_proves_only_its_latest_record() {
    let o = StreamOracle::new(SimDevice::new(1 << 30));
    let e = o.create_event().unwrap();
    o.record_event(e, A).unwrap();
    o.note_malloc(P, N, A);
    o.note_free(P);
    // the free's event is recorded on C, not A: A's work is not covered
    o.record_event(e, C).unwrap();
    o.device().complete_all();
    assert!(o.query_event(e).unwrap());
    o.note_malloc(P, N, B);
    assert_eq!(o.report().stream_violations, N);
}

/// Unmapping freed bytes before the stream that freed them is known done is a violation too:
/// a kernel still running there would fault. After a wait it is not.
#[test]
fn an_unmap_before_the_freeing_stream_is_done_is_a_violation() {
    let sim = SimDevice::new(1 << 30);
    let o = StreamOracle::new(sim.clone());
    let base = o.reserve(64 << 20).unwrap();
    o.map(base, 2 << 20).unwrap();
    o.note_malloc(base, N, A);
    o.note_free(base);
    o.unmap(base, 2 << 20).unwrap();
    let r = o.report();
    assert_eq!((r.stream_violations, r.stream_violation_count), (N, 1));
    let v = r.first_violation.expect("described");
    assert!(v.unmapped && v.to_string().contains("were unmapped"), "{v}");

    // the same with an event of A, recorded after the free and waited for, is clean
    let o = StreamOracle::new(sim);
    o.map(base + (2 << 20), 2 << 20).unwrap();
    o.note_malloc(base + (2 << 20), N, A);
    o.note_free(base + (2 << 20));
    let e = o.create_event().unwrap();
    o.record_event(e, A).unwrap();
    o.synchronize_event(e).unwrap();
    o.unmap(base + (2 << 20), 2 << 20).unwrap();
    assert_eq!(o.report().stream_violations, 0);
}
