//! The order in which the rows of the training set are evaluated.
//!
//! Only batch norm in `batch-stats` mode depends on it: each evaluation chunk of
//! `chunk_size` consecutive rows is normalised with its own statistics, so a class-sorted file
//! evaluated in file order makes every chunk single-class. By default the rows are drawn by a
//! seeded permutation ([`DataOrder::Shuffled`] with [`DEFAULT_SEED`]): row k of the evaluated
//! set is row `permutation(n, seed)[k]` of the file, and chunk c holds rows
//! `c·chunk_size .. (c+1)·chunk_size` of that sequence.
//!
//! The permutation is platform-independent and has a twin in Python
//! (`python/lca/_order.py`, used by the PyTorch engine and the Recorder):
//!
//! - **Generator**: SplitMix64 (Steele, Lea, Flood 2014). The state starts at `seed`; each
//!   draw adds 0x9E3779B97F4A7C15 (mod 2⁶⁴) to the state and returns it mixed:
//!   z ← (z ⊕ (z ≫ 30))·0xBF58476D1CE4E5B9, z ← (z ⊕ (z ≫ 27))·0x94D049BB133111EB, z ⊕ (z ≫ 31)
//!   (products mod 2⁶⁴).
//! - **Uniform integer below b**: draw r until r < ⌊2⁶⁴ / b⌋·b, return r mod b (unbiased).
//! - **Shuffle**: Fisher–Yates from the top: p = [0, 1, …, n−1]; for i = n−1 down to 1:
//!   j = below(i + 1), swap p[i] and p[j].

use serde::{Deserialize, Serialize};

/// The seed of the default permutation.
pub const DEFAULT_SEED: u64 = 0;

/// How the rows of the data file are ordered for evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "order", rename_all = "lowercase")]
pub enum DataOrder {
    /// The rows in the order of the file.
    #[default]
    File,
    /// The rows drawn by [`permutation`]`(n, seed)`.
    Shuffled { seed: u64 },
}

impl DataOrder {
    /// `file` or `shuffled`.
    pub fn name(self) -> &'static str {
        match self {
            DataOrder::File => "file",
            DataOrder::Shuffled { .. } => "shuffled",
        }
    }

    /// The seed, for the shuffled order.
    pub fn seed(self) -> Option<u64> {
        match self {
            DataOrder::File => None,
            DataOrder::Shuffled { seed } => Some(seed),
        }
    }

    /// The `analyze` options that select this order (for messages saying what to pass).
    pub fn flags(self) -> String {
        match self {
            DataOrder::File => "--data-order file".to_string(),
            DataOrder::Shuffled { seed } => format!("--data-order shuffled --data-seed {seed}"),
        }
    }

    /// From the names recorded in a summary or sent by a worker (`None`: not recorded, i.e.
    /// written before the order existed: file order).
    pub fn from_parts(name: Option<&str>, seed: Option<u64>) -> Option<DataOrder> {
        match (name, seed) {
            (None | Some("file"), _) => Some(DataOrder::File),
            (Some("shuffled"), Some(seed)) => Some(DataOrder::Shuffled { seed }),
            _ => None,
        }
    }
}

impl std::fmt::Display for DataOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataOrder::File => write!(f, "file order"),
            DataOrder::Shuffled { seed } => write!(f, "shuffled (seed {seed})"),
        }
    }
}

/// The SplitMix64 generator (see the module documentation).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next 64-bit draw.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..bound` (`bound` ≥ 1), by rejection.
    pub fn below(&mut self, bound: u64) -> u64 {
        let zone = ((1u128 << 64) / u128::from(bound)) * u128::from(bound);
        loop {
            let r = self.next_u64();
            if u128::from(r) < zone {
                return r % bound;
            }
        }
    }
}

/// The permutation of `0..n` for `seed`: row k of the evaluated set is row `p[k]` of the file.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    let mut g = SplitMix64::new(seed);
    for i in (1..n).rev() {
        let j = g.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// Reorder the rows of `v` (rows of `row` elements) in place: afterwards row k holds what row
/// `perm[k]` held. Needs one row of extra memory (cycles of the permutation are followed).
pub fn permute_rows<T: Copy>(v: &mut [T], row: usize, perm: &[usize]) {
    debug_assert_eq!(v.len(), row * perm.len());
    if row == 0 {
        return;
    }
    let mut done = vec![false; perm.len()];
    let mut tmp: Vec<T> = Vec::with_capacity(row);
    for start in 0..perm.len() {
        if done[start] || perm[start] == start {
            done[start] = true;
            continue;
        }
        tmp.clear();
        tmp.extend_from_slice(&v[start * row..(start + 1) * row]);
        let mut j = start;
        loop {
            done[j] = true;
            let next = perm[j];
            if next == start {
                v[j * row..(j + 1) * row].copy_from_slice(&tmp);
                break;
            }
            v.copy_within(next * row..(next + 1) * row, j * row);
            j = next;
        }
    }
}

/// How clustered the labels of a classification set are in file order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabelRuns {
    /// Fraction of neighbouring rows with the same label.
    pub same_neighbours: f64,
    /// The same fraction expected in a random order (Σ_c p_c²).
    pub expected: f64,
    /// Whether the labels are sorted (non-decreasing or non-increasing, more than one class).
    pub sorted: bool,
    /// Longest run of one label.
    pub longest_run: usize,
}

impl LabelRuns {
    /// Of one label per row (`ids`); `None` with fewer than two rows or one class.
    pub fn of(ids: &[u32]) -> Option<LabelRuns> {
        if ids.len() < 2 {
            return None;
        }
        let mut counts = std::collections::HashMap::new();
        for &c in ids {
            *counts.entry(c).or_insert(0usize) += 1;
        }
        if counts.len() < 2 {
            return None;
        }
        let n = ids.len() as f64;
        let expected = counts.values().map(|&k| (k as f64 / n).powi(2)).sum();
        let same = ids.windows(2).filter(|w| w[0] == w[1]).count();
        let (mut longest, mut run) = (1, 1);
        for w in ids.windows(2) {
            run = if w[0] == w[1] { run + 1 } else { 1 };
            longest = longest.max(run);
        }
        let sorted = ids.windows(2).all(|w| w[0] <= w[1]) || ids.windows(2).all(|w| w[0] >= w[1]);
        Some(LabelRuns {
            same_neighbours: same as f64 / (n - 1.0),
            expected,
            sorted,
            longest_run: longest,
        })
    }

    /// Whether chunks of consecutive rows are far from a random mix of the classes: sorted,
    /// or at least halfway from a random order (`expected`) to a fully sorted one (1) in the
    /// fraction of neighbours that share a label.
    pub fn clustered(&self) -> bool {
        self.sorted || self.same_neighbours >= self.expected + 0.5 * (1.0 - self.expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixed vectors, also asserted by the Python twin (`python/tests/test_order.py`).
    #[test]
    fn the_generator_and_the_permutation_match_the_fixed_vectors() {
        let mut g = SplitMix64::new(0);
        // SplitMix64's published first outputs for seed 0.
        assert_eq!(g.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(g.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(permutation(0, 0), Vec::<usize>::new());
        assert_eq!(permutation(1, 7), vec![0]);
        for (n, seed, want) in fixed_vectors() {
            assert_eq!(permutation(n, seed), want, "n {n} seed {seed}");
        }
        // The default order of a set the size of the digits fixtures'.
        let p = permutation(1797, DEFAULT_SEED);
        assert_eq!(&p[..8], &[1219, 1332, 145, 640, 51, 272, 824, 106]);
        assert_eq!(&p[1793..], &[220, 199, 1452, 1441]);
    }

    pub(crate) fn fixed_vectors() -> Vec<(usize, u64, Vec<usize>)> {
        vec![
            (10, 0, vec![6, 3, 2, 9, 8, 1, 4, 7, 0, 5]),
            (10, 1, vec![4, 2, 8, 1, 9, 3, 0, 6, 7, 5]),
            (
                16,
                12345,
                vec![1, 4, 8, 9, 11, 13, 15, 7, 14, 6, 10, 3, 2, 5, 12, 0],
            ),
            (5, u64::MAX, vec![2, 0, 3, 4, 1]),
        ]
    }

    #[test]
    fn a_permutation_is_one_and_depends_on_the_seed() {
        for n in [2usize, 3, 100, 1797] {
            let mut p = permutation(n, 3);
            assert_ne!(p, permutation(n, 4));
            p.sort_unstable();
            assert_eq!(p, (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn rows_move_where_the_permutation_says() {
        let perm = permutation(50, 9);
        let mut v: Vec<u32> = (0..150).collect();
        permute_rows(&mut v, 3, &perm);
        for (k, &src) in perm.iter().enumerate() {
            assert_eq!(
                &v[3 * k..3 * k + 3],
                &[3 * src as u32, 3 * src as u32 + 1, 3 * src as u32 + 2]
            );
        }
    }

    #[test]
    fn sorted_and_clustered_labels_are_recognised() {
        let sorted: Vec<u32> = (0..1000).map(|i| i / 100).collect();
        let r = LabelRuns::of(&sorted).unwrap();
        assert!(r.sorted && r.clustered() && r.longest_run == 100);
        // Runs of 20 of one class, classes cycling: not sorted, still clustered.
        let runs: Vec<u32> = (0..1000).map(|i| (i / 20) % 10).collect();
        let r = LabelRuns::of(&runs).unwrap();
        assert!(!r.sorted && r.clustered(), "{r:?}");
        // The same labels shuffled: not clustered.
        let p = permutation(1000, 1);
        let shuffled: Vec<u32> = p.iter().map(|&i| sorted[i]).collect();
        let r = LabelRuns::of(&shuffled).unwrap();
        assert!(!r.sorted && !r.clustered(), "{r:?}");
        assert!((r.expected - 0.1).abs() < 1e-12);
        assert!(LabelRuns::of(&[3, 3, 3]).is_none());
    }
}
