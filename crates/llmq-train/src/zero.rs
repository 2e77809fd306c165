//! Data parallelism with ZeRO sharding: what each rank of a group holds and how the pieces meet.
//!
//! Every parameter group (embedding, block l, head) of n elements is split into `world` shards of
//! S = `shard_len(n, world)` elements; rank r owns elements [r·S, min((r+1)·S, n)). Buffers that
//! are gathered or reduce-scattered whole are padded to world·S (the padding stays zero).
//! - ZeRO-1 (always, with more than one rank): Adam m and v and separate master weights hold only
//!   the rank's shard. Gradients are full; after the step's last micro-batch each group's
//!   gradient is reduce-scattered in place, the optimizer updates the rank's shard, and the
//!   working weights are all-gathered.
//! - ZeRO-2 (`shard_gradients`): with one micro-batch per step, each block's gradient is computed
//!   into one of two device slots and reduce-scattered into a shard-sized buffer on the copy-back
//!   stream as soon as its backward is issued, beside the next block's backward. With more micro-batches the per-rank sums are needed whole until the
//!   last one, so the gradients are held as in ZeRO-1 (`--offload-gradients` keeps them on the
//!   host).
//! - ZeRO-3 (`shard_weights`): block weights hold only the rank's shard (on the device, or on
//!   the host with weight streaming) and are all-gathered into two device slots on the copy
//!   stream, block l + 1 while block l computes (`crate::stream::Slots`); the embedding and head
//!   stay whole. With persistent fp8 weights each rank quantises its shard with the global
//!   abs-maxes and the blocks' e4m3 bytes are gathered the same way (`crate::fp8_stream`), one
//!   byte per parameter; of the bf16 block only the norms and biases move, each piece broadcast
//!   from the rank whose shard holds it (the whole block on `--log-amax` steps, which read the
//!   bf16 matrices).
//!
//! - `--all-to-all-reduce`: every reduce-scatter above is an all-to-all into a device staging
//!   buffer of the largest padded group (allocated with the parameters, so the plan counts it)
//!   plus one local reduction (`llmq_core::all_to_all`), the same bits.
//!
//! The numbers do not depend on the level: every level reduces the same per-rank sums (each
//! rank's micro-batches accumulated in order, then ranks added in rank order, see
//! `llmq_core::comm`), updates the same shards and takes the gradient norm as the sum over groups
//! of the rank-order sum of per-shard sums of squares. They do depend on the number of ranks,
//! in the last bits (the sums are grouped differently); `tests/zero.rs` states the tolerances.

use llmq_core::comm::{shard_len, Comm};
use llmq_core::Segment;
use std::sync::Arc;

/// The rank's place in a data-parallel group and the sharding options.
#[derive(Clone)]
pub struct Dist {
    pub comm: Arc<dyn Comm>,
    pub shard_gradients: bool,
    pub shard_weights: bool,
    /// Reduce-scatters through `llmq_core::all_to_all` (`--all-to-all-reduce`).
    pub all_to_all_reduce: bool,
}

impl Dist {
    /// The sharding of a run of `tc` on `comm`'s group; `None` for a group of one (the
    /// single-device layout).
    pub fn for_run(comm: Arc<dyn Comm>, tc: &crate::TrainConfig) -> Option<Dist> {
        (comm.world() > 1).then(|| Dist {
            comm,
            // with several micro-batches the per-rank sums are needed whole until the last one
            shard_gradients: tc.memory.shard_gradients && tc.grad_accumulation == 1,
            shard_weights: tc.memory.shard_weights,
            all_to_all_reduce: tc.memory.all_to_all_reduce,
        })
    }

    /// Rank 0 of a group of `tc.world_size` that is never used for a collective: the memory
    /// plan of one rank (rank 0 holds the largest shards).
    pub fn for_planning(tc: &crate::TrainConfig) -> Option<Dist> {
        let comm = llmq_core::ThreadComm::group(tc.world_size, std::time::Duration::ZERO).into_iter().next()?;
        Dist::for_run(Arc::new(comm), tc)
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    pub fn world(&self) -> usize {
        self.comm.world()
    }
}

/// The rank's shard of a group of `n` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// First element owned (r·S).
    pub start: usize,
    /// Elements owned (may be 0 for the last ranks of a small group).
    pub len: usize,
    /// Shard size S.
    pub size: usize,
    /// The padded length world·S.
    pub padded: usize,
}

impl Shard {
    pub fn of(n: usize, rank: usize, world: usize) -> Shard {
        let size = shard_len(n, world);
        let start = (rank * size).min(n);
        Shard { start, len: (n - start).min(size), size, padded: size * world.max(1) }
    }

    /// `segments` (of the whole group) cut to this shard, relative to its start, keeping the
    /// index of the segment each piece comes from.
    pub fn segments(&self, segments: &[Segment]) -> Vec<(usize, Segment)> {
        let (lo, hi) = (self.start, self.start + self.len);
        segments
            .iter()
            .enumerate()
            .filter_map(|(si, s)| {
                let (a, b) = (s.offset.max(lo), (s.offset + s.len).min(hi));
                (a < b).then(|| (si, Segment { offset: a - lo, len: b - a, decay: s.decay }))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_a_group_exactly_once() {
        for (n, world) in [(1000, 2), (1000, 3), (129, 4), (5, 4), (100_000, 8), (7, 1)] {
            let shards: Vec<Shard> = (0..world).map(|r| Shard::of(n, r, world)).collect();
            let mut next = 0;
            for s in &shards {
                assert!(s.len == 0 || s.start == next, "{n}/{world}: {s:?} after {next}");
                next += s.len;
                assert_eq!(s.padded, s.size * world);
                assert!(s.size % 128 == 0 || world == 1);
            }
            assert_eq!(next, n, "{n}/{world}");
        }
        assert_eq!(Shard::of(7, 0, 1), Shard { start: 0, len: 7, size: 7, padded: 7 });
    }

    #[test]
    fn segments_are_cut_to_the_shard() {
        let segs = [Segment { offset: 0, len: 100, decay: true }, Segment { offset: 128, len: 200, decay: false }];
        let s = Shard { start: 128, len: 128, size: 128, padded: 512 };
        assert_eq!(s.segments(&segs), vec![(1, Segment { offset: 0, len: 128, decay: false })]);
        let s = Shard { start: 0, len: 256, size: 256, padded: 512 };
        assert_eq!(s.segments(&segs), vec![(0, Segment { offset: 0, len: 100, decay: true }), (1, Segment { offset: 128, len: 128, decay: false })]);
    }
}
