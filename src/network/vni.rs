//! VXLAN network identifiers (VNIs) for pod tunnels.
//!
//! Each sandbox with a tunnel gets its VNI when CreateVM records it, in the
//! same journal write as its `Pending` record, and keeps it until the record
//! is gone: a retried StartVM, a recovery after a crash, a re-created
//! tunnel all reuse the journaled one. So VNIs in use are exactly those of
//! the journal's records (plus those handed out for records still being
//! written), and a restart cannot hand out a VNI a live pod holds — the
//! reference counts from `-vxlan-min-id` in memory and did (CAA #3280).

use std::collections::BTreeSet;

pub use super::VXLAN_MAX_ID as MAX_VNI;

/// The VNIs this node hands out: `min..=MAX_VNI`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VniRange {
    /// The lowest (`--vxlan-min-id`, default 555000 as the reference's).
    pub min: u32,
}

/// Every VNI of the range is taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no free VXLAN network identifier from {min} to {MAX_VNI}: {taken} in use")]
pub struct VnisExhausted {
    /// The range's lowest VNI.
    pub min: u32,
    /// How many of the range are in use.
    pub taken: usize,
}

impl VniRange {
    /// The lowest VNI of the range not in `taken` (VNIs outside the range
    /// there are ignored): freed VNIs are reused lowest first, as the
    /// reference's are after a restart, but never while a record holds one.
    ///
    /// # Errors
    /// [`VnisExhausted`] when all `MAX_VNI - min + 1` are taken.
    pub fn lowest_free(&self, taken: &BTreeSet<u32>) -> Result<u32, VnisExhausted> {
        let mut candidate = self.min;
        for &vni in taken.range(self.min..=MAX_VNI) {
            if vni != candidate {
                break;
            }
            if candidate == MAX_VNI {
                return Err(VnisExhausted {
                    min: self.min,
                    taken: taken.range(self.min..=MAX_VNI).count(),
                });
            }
            candidate += 1;
        }
        Ok(candidate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u32]) -> BTreeSet<u32> {
        v.iter().copied().collect()
    }

    #[test]
    fn the_lowest_free_vni_of_the_range_is_handed_out() {
        let r = VniRange { min: 555_000 };
        assert_eq!(r.lowest_free(&set(&[])), Ok(555_000));
        assert_eq!(r.lowest_free(&set(&[555_000, 555_001])), Ok(555_002));
        // A freed VNI below others is reused first.
        assert_eq!(r.lowest_free(&set(&[555_000, 555_002])), Ok(555_001));
        // VNIs below the range (a lowered --vxlan-min-id) do not count.
        assert_eq!(r.lowest_free(&set(&[1, 2, 555_000])), Ok(555_001));
    }

    #[test]
    fn a_full_range_is_an_error_not_a_wrap() {
        let r = VniRange { min: MAX_VNI - 2 };
        assert_eq!(
            r.lowest_free(&set(&[MAX_VNI - 2, MAX_VNI])),
            Ok(MAX_VNI - 1)
        );
        let err = r
            .lowest_free(&set(&[MAX_VNI - 2, MAX_VNI - 1, MAX_VNI]))
            .unwrap_err();
        assert_eq!(
            err,
            VnisExhausted {
                min: MAX_VNI - 2,
                taken: 3
            }
        );
        assert!(err.to_string().contains("3 in use"), "{err}");
    }

    #[test]
    fn handing_out_one_at_a_time_never_repeats_a_held_vni() {
        // 2,000 steps of allocating and freeing at random: every VNI handed
        // out is free at that moment and the lowest such.
        let r = VniRange { min: 100 };
        let mut held = BTreeSet::new();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2_000 {
            if held.is_empty() || rng.bool() {
                let vni = r.lowest_free(&held).unwrap();
                assert!(!held.contains(&vni));
                assert!((100..vni).all(|v| held.contains(&v)));
                held.insert(vni);
            } else {
                let i = rng.usize(..held.len());
                let vni = *held.iter().nth(i).unwrap();
                held.remove(&vni);
            }
        }
    }
}
