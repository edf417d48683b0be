//! Maglev consistent hashing: the lookup table the datapath indexes by flow hash to pick a backend.
//!
//! Follows Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer" (NSDI 2016), §3.4 and its
//! Pseudocode 1, extended with backend weights the way Katran and Cilium do it (see [`build_table`]).
//!
//! The table must be a pure function of the backend set: every node builds its own copy, and a flow that ECMP moves
//! to another node, or that outlives an agent restart or upgrade, keeps its backend only if both tables agree. Hence
//! the hand-written hash below instead of std's randomly keyed `RandomState`, and the internal sort by key.

use std::cmp::Ordering;

use thiserror::Error;

/// Table sizes lb chooses from (primes).
pub const TABLE_SIZES: &[u32] = &[251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];

/// Smallest size in TABLE_SIZES that is >= max(min_size, 100 * backends), capped at max_size (use the largest listed
/// size <= max_size). 0 backends -> smallest allowed size.
///
/// The factor 100 follows the paper (§3.4: M > 100·N keeps the difference in hash space between backends within
/// 1%). A larger M also moves fewer extra flows when a backend leaves (§5.3; see the disruption test for numbers).
/// If `max_size` is below every listed size the smallest listed size is returned anyway, because a table must exist;
/// `max_size` wins over `min_size` when they conflict.
///
/// Callers should keep a service's size stable where they can: a table of another size is a different permutation
/// space, so changing M remaps nearly every flow, unlike adding or removing a backend.
/// The table size lb gives a service with `backends` backends: [`table_size_for`] applied to the backend count
/// rounded up to a power of 4 (1-4, 5-16, 17-64, 65-256, ...).
///
/// Changing M remaps nearly every flow, so M must not follow every scale step (3 -> 2 pods would otherwise move
/// two thirds of the surviving flows). It must also stay a pure function of the backend set, never of history,
/// so that every node with the same Service state builds the same table and a flow moved by ECMP keeps its
/// backend. Steps at powers of 4 do both: scaling by a pod crosses a step only at 4/5, 16/17, 64/65, ..., and
/// the table still holds at least 100 slots per backend.
pub fn stable_table_size(backends: usize, min_size: u32, max_size: u32) -> u32 {
    let mut bucket = 4usize;
    while bucket < backends {
        bucket = bucket.saturating_mul(4);
    }
    table_size_for(bucket, min_size, max_size)
}

pub fn table_size_for(backends: usize, min_size: u32, max_size: u32) -> u32 {
    let wanted = u64::try_from(backends)
        .unwrap_or(u64::MAX)
        .saturating_mul(100)
        .max(u64::from(min_size));
    let cap = TABLE_SIZES
        .iter()
        .rev()
        .copied()
        .find(|&size| size <= max_size)
        .unwrap_or(SMALLEST_TABLE_SIZE);
    TABLE_SIZES
        .iter()
        .copied()
        .find(|&size| u64::from(size) >= wanted)
        .map_or(cap, |size| size.min(cap))
}

const SMALLEST_TABLE_SIZE: u32 = 251;

/// One backend as Maglev sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend<'a> {
    /// Stable identity of the backend (e.g. the bytes of "ip:port"). Its permutation derives from these bytes alone,
    /// so the key must not contain anything that differs between nodes or restarts, such as an allocated id.
    pub key: &'a [u8],
    /// Relative share of the table; 0 keeps the backend out of the table (e.g. a terminating endpoint).
    pub weight: u16,
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum MaglevError {
    /// A composite size makes some skips share a factor with M, so those permutations would not cover the table
    /// (§3.4 requires M prime).
    #[error("Maglev table size {0} is not a prime")]
    SizeNotPrime(u32),
    #[error("no backend has a weight above 0")]
    NoBackends,
    #[error("{backends} backends do not fit a Maglev table of {size} slots")]
    TooManyBackends { backends: usize, size: u32 },
    /// Two backends with one key would get the same permutation, and which of them wins a slot would depend on
    /// input order.
    #[error("backends {first} and {second} have the same key")]
    DuplicateKey { first: usize, second: usize },
}

/// Builds a Maglev lookup table of `m` slots.
///
/// Returns M entries; entry i is the index (into `backends`) of the backend owning slot i.
///
/// The table depends only on the set of (key, weight) pairs: backends are ordered by key internally, because which
/// backend wins a contested slot depends on the order of turns within a round (Pseudocode 1). Keys must be unique.
/// Backends with weight 0 never appear; they still count for the duplicate-key check, not for the size check.
///
/// # Permutations (§3.4)
///
/// Backend i prefers the slots `permutation[j] = (offset + j * skip) mod M` for j = 0, 1, …, where
/// `offset = h1(key) mod M` and `skip = h2(key) mod (M - 1) + 1`. As M is prime and 1 <= skip < M, this visits every
/// slot exactly once. Entries are generated as the walk goes rather than stored (M × N words would be 262 MB for
/// M = 65521 and 1000 backends).
///
/// # Weights
///
/// Pseudocode 1 gives every backend one turn per round, and a turn claims the backend's next preferred slot that is
/// still empty. Weighted Maglev as in Katran's `MaglevHashV2` instead gives each backend a credit: every round it adds
/// its weight, and when the credit reaches `max_w` (the largest weight in the set) the backend spends `max_w` to take
/// a turn. A backend of weight w thus takes w / max_w turns per round (the max-weight backends take one every round).
/// Unlike Katran, whose credits start at 0, credits here start at `max_w - w`, so every backend takes a turn in the
/// first round: like Cilium's weighted Maglev, any backend with weight > 0 owns at least one slot, however skewed the
/// weights. Backend i therefore owns `1 + (M - N) * w_i / sum(w)` slots up to rounding: one slot, plus its share
/// `w_i / sum(w)` of the rest. With equal weights this is exactly Pseudocode 1. Scaling all weights by a constant
/// gives the same table; changing the largest weight reschedules every backend's turns, and so moves more flows than
/// changing another backend's weight.
///
/// # Cost
///
/// With equal weights, filling takes O(M log M) expected steps (§3.4). With weights each round also visits every
/// backend, about `N * M * max_w / sum(w)` credit updates in all.
pub fn build_table(backends: &[MaglevBackend<'_>], m: u32) -> Result<Vec<u32>, MaglevError> {
    if !is_prime(m) {
        return Err(MaglevError::SizeNotPrime(m));
    }
    let too_many = |backends: usize| MaglevError::TooManyBackends { backends, size: m };

    let mut sorted: Vec<(usize, &MaglevBackend<'_>)> = backends.iter().enumerate().collect();
    sorted.sort_unstable_by(|a, b| a.1.key.cmp(b.1.key));
    if let Some(pair) = sorted
        .windows(2)
        .find(|pair| pair[0].1.key == pair[1].1.key)
    {
        let (a, b) = (pair[0].0, pair[1].0);
        return Err(MaglevError::DuplicateKey {
            first: a.min(b),
            second: a.max(b),
        });
    }

    let mut cursors = Vec::new();
    for (index, backend) in sorted.into_iter().filter(|(_, b)| b.weight > 0) {
        // Output entries are u32; EMPTY (u32::MAX) can then never be a real index either.
        let index = u32::try_from(index)
            .ok()
            .filter(|&index| index != EMPTY)
            .ok_or_else(|| too_many(backends.len()))?;
        cursors.push(Cursor::new(backend, index, m));
    }
    if cursors.is_empty() {
        return Err(MaglevError::NoBackends);
    }
    if cursors.len() > usize::try_from(m).unwrap_or(usize::MAX) {
        // Some backend would get no slot at all; the paper assumes M ≫ N.
        return Err(too_many(cursors.len()));
    }

    let max_weight = cursors.iter().map(|c| c.weight).max().unwrap_or(1);
    for cursor in &mut cursors {
        cursor.credit = max_weight - cursor.weight;
    }

    let mut table = vec![EMPTY; m as usize];
    let mut filled: u32 = 0;
    // Terminates: each round the max-weight backends take a turn, and a turn always finds an empty slot while the
    // table is not full, because the slots a backend has walked past are all taken and its walk covers the table.
    loop {
        for cursor in &mut cursors {
            cursor.credit += cursor.weight;
            if cursor.credit < max_weight {
                continue;
            }
            cursor.credit -= max_weight;
            cursor.claim(&mut table, m);
            filled += 1;
            if filled == m {
                return Ok(table);
            }
        }
    }
}

/// Marks a slot nobody has claimed yet.
const EMPTY: u32 = u32::MAX;

/// A backend's walk along its permutation (the paper's `next[i]`, kept as the slot it points at).
struct Cursor {
    index: u32,
    /// u32, like `credit`: the credit stays below `max_w` before a round adds up to `max_w`, which can exceed u16.
    weight: u32,
    credit: u32,
    skip: u32,
    slot: u32,
}

impl Cursor {
    fn new(backend: &MaglevBackend<'_>, index: u32, m: u32) -> Self {
        let m64 = u64::from(m);
        // Both results are below m, so the narrowing casts are lossless.
        let offset = (hash64(backend.key, SEED_OFFSET) % m64) as u32;
        let skip = (hash64(backend.key, SEED_SKIP) % (m64 - 1) + 1) as u32;
        Cursor {
            index,
            weight: u32::from(backend.weight),
            credit: 0,
            skip,
            slot: offset,
        }
    }

    /// One turn of Pseudocode 1: take the most preferred slot that is still empty.
    fn claim(&mut self, table: &mut [u32], m: u32) {
        while table[self.slot as usize] != EMPTY {
            self.advance(m);
        }
        table[self.slot as usize] = self.index;
        self.advance(m);
    }

    /// slot = (slot + skip) mod m without the division and without overflowing u32 (m may be close to u32::MAX).
    fn advance(&mut self, m: u32) {
        let room = m - self.skip;
        self.slot = if self.slot >= room {
            self.slot - room
        } else {
            self.slot + self.skip
        };
    }
}

/// Seeds for the paper's h1 (offset) and h2 (skip). They must differ so that offset and skip are independent. Like
/// the hash itself they are part of the table format: changing either remaps every flow of every service.
const SEED_OFFSET: u64 = 0x9e37_79b9_7f4a_7c15;
const SEED_SKIP: u64 = 0xc2b2_ae3d_27d4_eb4f;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a over `bytes`, continuing from `state`.
fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        state = (state ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
    }
    state
}

/// MurmurHash3's 64-bit finalizer. FNV-1a's low bits depend only on the inputs' low bits, and `mod M` reads mostly
/// the low bits; this bijective avalanche step spreads every input bit over the whole word.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Seeded hash of a backend key: fmix64(FNV-1a(seed as 8 little-endian bytes ++ key)). Deterministic across
/// processes, platforms and Rust versions, which std's `Hasher`s do not promise.
fn hash64(key: &[u8], seed: u64) -> u64 {
    fmix64(fnv1a(fnv1a(FNV_OFFSET_BASIS, &seed.to_le_bytes()), key))
}

/// Trial division: sizes are at most u32::MAX, so at most ~33k odd divisors, and it runs once per table build.
fn is_prime(n: u32) -> bool {
    match n.cmp(&3) {
        Ordering::Less => n == 2,
        Ordering::Equal => true,
        Ordering::Greater => {
            if n.is_multiple_of(2) {
                return false;
            }
            let n = u64::from(n);
            let mut divisor = 3;
            while divisor * divisor <= n {
                if n % divisor == 0 {
                    return false;
                }
                divisor += 2;
            }
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u32 = 251;
    const MAX: u32 = 65521;

    /// Realistic, distinct "ip:port" keys.
    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256))
            .collect()
    }

    fn with_weights<'a>(keys: &'a [String], weights: &[u16]) -> Vec<MaglevBackend<'a>> {
        keys.iter()
            .zip(weights)
            .map(|(key, &weight)| MaglevBackend {
                key: key.as_bytes(),
                weight,
            })
            .collect()
    }

    fn equal(keys: &[String]) -> Vec<MaglevBackend<'_>> {
        with_weights(keys, &vec![1; keys.len()])
    }

    /// Slots owned by each input index.
    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &owner in table {
            counts[owner as usize] += 1;
        }
        counts
    }

    /// The table as owner keys, so tables built from differently ordered inputs compare directly.
    fn owner_keys<'a>(table: &[u32], backends: &[MaglevBackend<'a>]) -> Vec<&'a [u8]> {
        table.iter().map(|&i| backends[i as usize].key).collect()
    }

    /// Deterministic Fisher-Yates driven by xorshift64, so a failure reproduces.
    fn shuffle<T>(items: &mut [T], mut state: u64) {
        for i in (1..items.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            items.swap(i, (state % (i as u64 + 1)) as usize);
        }
    }

    fn build(backends: &[MaglevBackend<'_>], m: u32) -> Vec<u32> {
        let table = build_table(backends, m).expect("valid input");
        assert_eq!(table.len(), m as usize);
        assert!(table.iter().all(|&i| (i as usize) < backends.len()));
        table
    }

    #[test]
    fn every_weighted_backend_appears() {
        for n in [1, 2, 3, 10, 100, 1000] {
            let names = keys(n);
            let table = build(&equal(&names), table_size_for(n, MIN, MAX));
            let owned = counts(&table, n);
            assert!(
                owned.iter().all(|&c| c > 0),
                "n={n}: a backend owns no slot: {owned:?}"
            );
        }

        // Skewed weights in a small table: proportional shares would round the light backends down to 0 slots.
        let names = keys(50);
        let mut weights = vec![1; 50];
        weights[7] = u16::MAX;
        let owned = counts(&build(&with_weights(&names, &weights), 251), 50);
        assert!(owned.iter().all(|&c| c > 0), "skewed weights: {owned:?}");

        // As many backends as slots: exactly one slot each.
        let names = keys(251);
        let owned = counts(&build(&equal(&names), 251), 251);
        assert!(owned.iter().all(|&c| c == 1), "{owned:?}");
    }

    #[test]
    fn zero_weight_backends_get_no_slot() {
        let names = keys(10);
        let weights = [1, 0, 1, 1, 0, 1, 1, 1, 1, 0];
        let table = build(&with_weights(&names, &weights), 1021);
        let owned = counts(&table, 10);
        for (i, (&count, &weight)) in owned.iter().zip(&weights).enumerate() {
            assert_eq!(
                count > 0,
                weight > 0,
                "backend {i}: weight {weight}, {count} slots"
            );
        }
    }

    #[test]
    fn load_is_balanced_when_table_is_100x_backends() {
        for n in [3, 10, 100] {
            let m = table_size_for(n, MIN, MAX);
            assert!(m as usize >= 100 * n);
            let names = keys(n);
            let table = build(&equal(&names), m);
            let owned = counts(&table, n);
            let mean = f64::from(m) / n as f64;
            let max = *owned.iter().max().unwrap() as f64;
            let min = *owned.iter().min().unwrap() as f64;
            println!(
                "n={n} m={m}: max/mean={:.4} min/mean={:.4}",
                max / mean,
                min / mean
            );
            assert!(max / mean <= 1.02, "n={n} m={m}: max/mean {}", max / mean);
        }
    }

    /// Removes each backend in turn from `n` equal ones in a table of `m` slots, and returns the mean and worst
    /// fraction of slots whose owner changed (by key), as multiples of the ideal 1/n.
    fn disruption(n: usize, m: u32) -> (f64, f64) {
        let names = keys(n);
        let all = equal(&names);
        let before_table = build(&all, m);
        let before = owner_keys(&before_table, &all);
        let (mut worst, mut sum) = (0.0f64, 0.0);
        // Every choice of removed backend, not just a lucky one.
        for removed in 0..n {
            let rest: Vec<_> = (0..n).filter(|&i| i != removed).map(|i| all[i]).collect();
            let after = owner_keys(&build(&rest, m), &rest);
            for (slot, (b, a)) in before.iter().zip(&after).enumerate() {
                if *b == all[removed].key {
                    assert_ne!(
                        a, b,
                        "n={n} m={m}: slot {slot} of the removed backend did not move"
                    );
                }
            }
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let fraction = moved as f64 / f64::from(m) * n as f64;
            worst = worst.max(fraction);
            sum += fraction;
        }
        (sum / n as f64, worst)
    }

    #[test]
    fn removing_a_backend_moves_little_more_than_its_share() {
        // Maglev is not minimally disruptive (§3.4): once a backend leaves, the others win contested slots earlier
        // and their later picks cascade. The excess shrinks as M/N grows (§5.3, Figure 12) but grows with N at a
        // fixed M/N: at the 100 x N sizes, N = 50 gets M = 8191 and moves ~1.8x its share, and idealised random
        // permutations do the same (simulated 1.69-1.82x mean, 1.86-2.08x worst), so that case has a looser bound.
        let cases = [
            (5, table_size_for(5, MIN, MAX), 1.5),
            (10, table_size_for(10, MIN, MAX), 1.5),
            (50, table_size_for(50, MIN, MAX), 2.25),
            // The paper's evaluation size (M = 65537 there).
            (5, MAX, 1.5),
            (10, MAX, 1.5),
            (50, MAX, 1.5),
        ];
        for (n, m, bound) in cases {
            let (mean, worst) = disruption(n, m);
            println!("n={n} m={m}: moved mean {mean:.3}x, worst {worst:.3}x of the ideal 1/n");
            assert!(
                worst <= bound,
                "n={n} m={m}: moved {worst:.3}x > {bound}x the ideal 1/n"
            );
        }
    }

    #[test]
    fn deterministic_and_independent_of_input_order() {
        let names = keys(40);
        let weights: Vec<u16> = (0..40).map(|i| [1, 2, 3, 0, 5][i % 5]).collect();
        let backends = with_weights(&names, &weights);
        let m = table_size_for(40, MIN, MAX);
        let table = build(&backends, m);
        assert_eq!(table, build(&backends, m));
        let reference = owner_keys(&table, &backends);

        let mut reversed = backends.clone();
        reversed.reverse();
        assert_eq!(owner_keys(&build(&reversed, m), &reversed), reference);
        for seed in 1..=5 {
            let mut shuffled = backends.clone();
            shuffle(&mut shuffled, seed);
            assert_ne!(shuffled, backends);
            assert_eq!(
                owner_keys(&build(&shuffled, m), &shuffled),
                reference,
                "seed {seed}"
            );
        }

        // The key, not the position, decides: another set must give another table.
        let other_keys: Vec<String> = names.iter().map(|k| k.replace(":8080", ":8081")).collect();
        let other = with_weights(&other_keys, &weights);
        assert_ne!(build(&other, m), table);
    }

    #[test]
    fn weight_two_gets_twice_the_slots() {
        for (n, m) in [(10, table_size_for(10, MIN, MAX)), (100, MAX)] {
            let names = keys(n);
            let mut weights = vec![1; n];
            weights[3] = 2;
            let table = build(&with_weights(&names, &weights), m);
            let owned = counts(&table, n);
            let ones: Vec<f64> = owned
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != 3)
                .map(|(_, &c)| c as f64)
                .collect();
            let mean_one = ones.iter().sum::<f64>() / ones.len() as f64;
            let ratio = owned[3] as f64 / mean_one;
            println!(
                "n={n} m={m}: weight-2 backend {} slots, weight-1 mean {mean_one:.2}, ratio {ratio:.4}",
                owned[3]
            );
            assert!((ratio - 2.0).abs() <= 0.04, "n={n} m={m}: ratio {ratio}");
        }
    }

    #[test]
    fn shares_follow_weights() {
        let names = keys(5);
        let weights = [1, 2, 3, 4, 5];
        let table = build(&with_weights(&names, &weights), MAX);
        let owned = counts(&table, 5);
        let total: u32 = weights.iter().map(|&w| u32::from(w)).sum();
        for (i, (&count, &w)) in owned.iter().zip(&weights).enumerate() {
            let expected = f64::from(MAX) * f64::from(w) / f64::from(total);
            let error = (count as f64 - expected).abs() / expected;
            println!(
                "backend {i}: weight {w}, {count} slots, expected {expected:.1}, error {error:.5}"
            );
            assert!(
                error <= 0.01,
                "backend {i}: {count} slots, expected {expected:.1}"
            );
        }

        // Only ratios matter: scaling every weight gives the same table.
        let scaled = [3, 6, 9, 12, 15];
        assert_eq!(build(&with_weights(&names, &scaled), MAX), table);
    }

    #[test]
    fn builds_the_largest_table_with_many_backends() {
        let names = keys(1000);
        let backends = equal(&names);
        let start = std::time::Instant::now();
        let table = build(&backends, MAX);
        println!("m={MAX} n=1000: built in {:?}", start.elapsed());
        let owned = counts(&table, 1000);
        // Unweighted Maglev is exactly balanced by construction: every backend ends with floor or ceil of M/N.
        let (lo, hi) = (MAX as usize / 1000, MAX as usize / 1000 + 1);
        assert!(owned.iter().all(|&c| c == lo || c == hi));
    }

    #[test]
    fn stable_size_changes_only_at_powers_of_four() {
        let sizes: Vec<u32> = (1..=300).map(|n| stable_table_size(n, MIN, MAX)).collect();
        for n in 1..300usize {
            let (here, next) = (sizes[n - 1], sizes[n]);
            if [4, 16, 64, 256].contains(&n) {
                assert!(
                    next > here,
                    "{n} -> {}: a step is expected at a power of 4",
                    n + 1
                );
            } else {
                assert_eq!(here, next, "{n} -> {}: no step expected", n + 1);
            }
            assert!(
                u64::from(here) >= 100 * n as u64,
                "{n} backends get only {here} slots"
            );
        }
    }

    #[test]
    fn table_size_for_edge_cases() {
        assert_eq!(table_size_for(0, MIN, MAX), 251);
        assert_eq!(table_size_for(0, 1000, MAX), 1021);
        assert_eq!(table_size_for(0, 0, MAX), 251);
        assert_eq!(table_size_for(2, MIN, MAX), 251);
        assert_eq!(table_size_for(3, MIN, MAX), 509);
        assert_eq!(table_size_for(10, MIN, MAX), 1021);
        // 100 * 40 = 4000 fits 4093 exactly; one more backend doubles the table.
        assert_eq!(table_size_for(40, MIN, MAX), 4093);
        assert_eq!(table_size_for(41, MIN, MAX), 8191);
        assert_eq!(table_size_for(655, MIN, MAX), 65521);
        assert_eq!(table_size_for(1000, MIN, MAX), 65521);
        assert_eq!(table_size_for(usize::MAX, MIN, MAX), 65521);
        assert_eq!(table_size_for(1000, MIN, 16381), 16381);
        assert_eq!(table_size_for(1000, MIN, 20000), 16381);
        assert_eq!(table_size_for(1000, MIN, u32::MAX), 65521);
        assert_eq!(table_size_for(0, u32::MAX, MAX), 65521);
        assert_eq!(table_size_for(0, 4093, 1021), 1021);
        assert_eq!(table_size_for(5, MIN, 100), 251);
        for &size in TABLE_SIZES {
            assert_eq!(table_size_for(0, size, MAX), size);
            assert_eq!(table_size_for(size as usize / 100, 0, MAX), size.max(251));
        }
    }

    #[test]
    fn table_sizes_are_ascending_primes() {
        assert!(TABLE_SIZES.windows(2).all(|w| w[0] < w[1]));
        assert!(TABLE_SIZES.iter().all(|&s| is_prime(s)));
        assert_eq!(TABLE_SIZES[0], SMALLEST_TABLE_SIZE);
    }

    #[test]
    fn is_prime_matches_a_sieve() {
        const LIMIT: usize = 70_000;
        let mut sieve = vec![true; LIMIT];
        sieve[0] = false;
        sieve[1] = false;
        for i in 2..LIMIT {
            if sieve[i] {
                for j in (i * i..LIMIT).step_by(i) {
                    sieve[j] = false;
                }
            }
        }
        for (n, &prime) in sieve.iter().enumerate() {
            assert_eq!(is_prime(n as u32), prime, "{n}");
        }
        assert!(is_prime(4_294_967_291)); // largest u32 prime
        assert!(!is_prime(u32::MAX));
        assert!(!is_prime(65_537 * 65_521)); // product of two primes above the sieve's reach
    }

    #[test]
    fn errors_for_bad_input() {
        let names = keys(300);
        let backends = equal(&names);
        for m in [0, 1, 4, 9, 255, 65535, 65536] {
            assert_eq!(
                build_table(&backends[..3], m),
                Err(MaglevError::SizeNotPrime(m))
            );
        }
        assert_eq!(build_table(&[], 251), Err(MaglevError::NoBackends));
        let zero = with_weights(&names[..3], &[0, 0, 0]);
        assert_eq!(build_table(&zero, 251), Err(MaglevError::NoBackends));
        assert_eq!(
            build_table(&backends[..3], 2),
            Err(MaglevError::TooManyBackends {
                backends: 3,
                size: 2
            })
        );
        assert_eq!(
            build_table(&backends[..252], 251),
            Err(MaglevError::TooManyBackends {
                backends: 252,
                size: 251
            })
        );
        // Zero-weight backends take no slot, so they do not count against the size.
        let mut mostly = backends[..252].to_vec();
        mostly[100].weight = 0;
        assert!(build_table(&mostly, 251).is_ok());

        let dup = [
            backends[0],
            backends[1],
            backends[2],
            MaglevBackend {
                key: backends[1].key,
                weight: 0,
            },
        ];
        assert_eq!(
            build_table(&dup, 251),
            Err(MaglevError::DuplicateKey {
                first: 1,
                second: 3
            })
        );

        // The smallest prime size works, with either backend count that fits.
        assert_eq!(build(&backends[..1], 2), vec![0, 0]);
        assert_eq!(counts(&build(&backends[..2], 2), 2), vec![1, 1]);
    }

    #[test]
    fn permutations_cover_the_table() {
        let names = keys(20);
        for m in [2, 3, 251, 65521] {
            for key in &names {
                let backend = MaglevBackend {
                    key: key.as_bytes(),
                    weight: 1,
                };
                let mut cursor = Cursor::new(&backend, 0, m);
                assert!((1..m).contains(&cursor.skip));
                let mut seen = vec![false; m as usize];
                for _ in 0..m {
                    assert!(
                        !seen[cursor.slot as usize],
                        "{key} m={m}: slot {} visited twice",
                        cursor.slot
                    );
                    seen[cursor.slot as usize] = true;
                    cursor.advance(m);
                }
            }
        }
        // advance near u32::MAX, where a plain slot + skip would overflow.
        let m = 4_294_967_291;
        let mut cursor = Cursor {
            index: 0,
            weight: 1,
            credit: 0,
            skip: m - 1,
            slot: m - 2,
        };
        cursor.advance(m);
        assert_eq!(cursor.slot, m - 3);
    }

    #[test]
    fn hash_is_fnv1a_then_fmix64() {
        // Published FNV-1a 64-bit test vectors (http://www.isthe.com/chongo/tech/comp/fnv/).
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b"foobar"), 0x8594_4171_f739_67e8);
        // fmix64 must be a bijection with 0 as a fixed point, and must actually mix.
        assert_eq!(fmix64(0), 0);
        assert_ne!(fmix64(1) & 0xffff_ffff, 1);

        // Pinned outputs: these values are the table format shared by all nodes and agent versions. If this fails,
        // the change remaps every flow on upgrade and lets mixed-version nodes disagree; do not just update them.
        assert_eq!(hash64(b"10.0.0.1:8080", SEED_OFFSET), PINNED[0]);
        assert_eq!(hash64(b"10.0.0.1:8080", SEED_SKIP), PINNED[1]);
        assert_eq!(hash64(b"[fd00::1]:443", SEED_OFFSET), PINNED[2]);

        // Seeds must give unrelated hashes, or offset and skip would correlate.
        let names = keys(1000);
        let agree = names
            .iter()
            .filter(|k| {
                hash64(k.as_bytes(), SEED_OFFSET) % 251 == hash64(k.as_bytes(), SEED_SKIP) % 251
            })
            .count();
        assert!(
            agree < 20,
            "{agree} of 1000 keys hash alike under both seeds"
        );
    }

    const PINNED: [u64; 3] = [
        0x209c_da67_86fc_ac28,
        0x350c_f29c_72ec_1cf7,
        0x7168_be1e_d2df_5a4c,
    ];
}
