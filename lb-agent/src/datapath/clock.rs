//! The programs' clock: conntrack entries and learned L2 headers are stamped with `bpf_jiffies64()` (inlined by the
//! verifier; `bpf_ktime_get_ns` is a ~30 ns helper call per packet). The agent needs the tick rate to tell the
//! programs (`ConfigValue::hz`) and to compare stamps with lifetimes, and "now" in jiffies for its garbage collector
//! and the `conntrack` listing.

use std::sync::OnceLock;

/// The kernel's tick rate (`CONFIG_HZ`): `CLOCK_MONOTONIC_COARSE` advances once per tick, and the kernel reports that
/// tick as its resolution (`LOW_RES_NSEC` = `TICK_NSEC`). Falls back to `lb_common::HZ_UNKNOWN_ASSUMED` (what the
/// programs assume for 0) if the clock is missing.
pub fn kernel_hz() -> u32 {
    static HZ: OnceLock<u32> = OnceLock::new();
    *HZ.get_or_init(|| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_getres writes one timespec into the one we own.
        let r = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        let tick_ns = (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64;
        if r != 0 || tick_ns == 0 || tick_ns > 1_000_000_000 {
            tracing::warn!(
                "cannot read the kernel tick rate from CLOCK_MONOTONIC_COARSE; assuming {}",
                lb_common::HZ_UNKNOWN_ASSUMED
            );
            return lb_common::HZ_UNKNOWN_ASSUMED;
        }
        ((1_000_000_000 + tick_ns / 2) / tick_ns) as u32
    })
}

/// `bpf_jiffies64()` now, derived from `CLOCK_MONOTONIC` (which jiffies follow tick by tick): the kernel starts
/// `jiffies_64` at `INITIAL_JIFFIES`, 300 s worth of ticks before the 32-bit wrap, as boot's monotonic zero. The
/// result trails the kernel's by the ticks between that zero and the first timer tick (a fraction of a second,
/// 64 ticks = 0.26 s on the 250 Hz test machine): precision enough for lifetimes of 10 s and more, and it errs
/// on the side of keeping an entry.
pub fn jiffies_now(hz: u32) -> u64 {
    let initial = u64::from((300u32.wrapping_mul(hz)).wrapping_neg());
    initial + super::packet_maps::monotonic_ns() / 1_000 * u64::from(hz) / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_rate_is_one_the_kernel_builds_with() {
        assert!(
            [100, 250, 300, 1000].contains(&kernel_hz()),
            "{}",
            kernel_hz()
        );
    }

    #[test]
    fn jiffies_follow_the_monotonic_clock_from_initial_jiffies() {
        let hz = kernel_hz();
        // The interval is measured, not assumed: on a busy machine the sleep overruns (seen: 124 ms for 100).
        let start = std::time::Instant::now();
        let a = jiffies_now(hz);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let b = jiffies_now(hz);
        let elapsed = start.elapsed();
        let ticks = b - a;
        let want = (elapsed.as_secs_f64() * f64::from(hz)).round() as u64;
        assert!(
            ticks + 2 >= want && ticks <= want + 2,
            "{ticks} ticks in {elapsed:?} at {hz} Hz (want {want} +- 2)"
        );
        // Past INITIAL_JIFFIES (the machine has been up for some time): larger than 2^32 - 300 s of ticks.
        assert!(a >= (1 << 32) - 300 * u64::from(hz));
    }
}
