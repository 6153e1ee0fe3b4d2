//! Hints to the CPU that change no result, only when memory arrives.
//!
//! A contact's slab entry, shm slot and strings are touched once per
//! interval, so they are never in cache when its timer fires or its reply
//! arrives; the worker knows which contacts come next (the due batch, the
//! reaped replies) and asks for their lines a few contacts ahead, so the
//! misses overlap instead of queueing one after another (tuning.md).
#![allow(unsafe_code)]

/// Asks for the cache lines holding `len` bytes from `p` (at most 4 lines:
/// a hint for one record, not a bulk copy). Any address is fine: a
/// prefetch never faults and reads nothing the program can observe.
#[inline(always)]
pub fn prefetch(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let first = p as usize & !63;
        let last = (p as usize).wrapping_add(len.max(1) - 1) & !63;
        // 1 to 4 lines; an address range that wraps around is one line.
        let lines = if last < first {
            1
        } else {
            ((last - first) >> 6).min(3) + 1
        };
        for i in 0..lines {
            let line = first.wrapping_add(i << 6);
            // SAFETY: PREFETCHT0 is a hint: it does not fault on any
            // address (unmapped, null, or past an allocation) and has no
            // architectural effect; SSE is part of the x86_64 baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

#[cfg(test)]
mod tests {
    use super::prefetch;

    #[test]
    fn any_address_is_only_a_hint() {
        let data = [7u8; 300];
        prefetch(data.as_ptr(), data.len());
        prefetch(data.as_ptr().wrapping_add(250), 1_000);
        prefetch(std::ptr::null(), 64);
        prefetch(usize::MAX as *const u8, 64);
        prefetch(0xdead_0000 as *const u8, 0);
        assert_eq!(data.iter().map(|&b| b as u32).sum::<u32>(), 7 * 300);
    }
}
