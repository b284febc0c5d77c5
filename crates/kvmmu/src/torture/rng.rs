//! A small deterministic generator (SplitMix64) so that a seed replays every actor's operation
//! sequence. Not cryptographic; no allocation, no shared state.

/// SplitMix64: each actor owns one, derived from the run seed and the actor's index.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for actor `stream` of the run seeded with `seed`.
    pub fn new(seed: u64, stream: u64) -> Rng {
        let mut r = Rng(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        r.next_u64();
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `[0, n)`; `n` must be non-zero.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n != 0, "Rng::below(0)");
        // Lemire's multiply-shift: unbiased enough for scheduling choices.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_stream_replay_the_same_sequence() {
        let (mut a, mut b) = (Rng::new(7, 3), Rng::new(7, 3));
        let mut c = Rng::new(7, 4);
        let xs: Vec<u64> = (0..16).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..16).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..16).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }

    #[test]
    fn below_stays_in_range() {
        let mut r = Rng::new(1, 1);
        assert!((0..1000).all(|_| r.below(13) < 13));
    }
}
