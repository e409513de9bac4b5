//! Per-source token buckets that slow down guessing of install codes (in memory only).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

/// Above this many tracked sources, buckets that have refilled completely are
/// dropped (a full bucket behaves exactly like a source never seen), so the
/// map only holds sources that made attempts in the last `burst * refill`.
const PRUNE_AT: usize = 1024;

/// Token buckets keyed by source address.
///
/// IPv4-mapped IPv6 addresses count as the IPv4 address, and IPv6 addresses
/// are grouped by /64, because one host usually controls a whole /64 and
/// could otherwise get a fresh bucket per address.
#[derive(Clone, Default)]
pub(crate) struct RateLimiter {
    buckets: HashMap<IpAddr, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u32,
    /// The time up to which refills have been credited.
    last: SystemTime,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("tracked_sources", &self.buckets.len())
            .finish()
    }
}

impl RateLimiter {
    /// Takes one token for `source`; `Err(seconds)` says how long to wait for
    /// the next one when the bucket is empty. A `burst` of 0 is treated as 1,
    /// and a zero `refill` disables the limit.
    pub(crate) fn take(
        &mut self,
        source: IpAddr,
        now: SystemTime,
        burst: u32,
        refill: Duration,
    ) -> Result<(), u64> {
        let burst = burst.max(1);
        let key = source_key(source);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= PRUNE_AT {
            self.buckets.retain(|_, bucket| {
                let mut b = *bucket;
                b.refill(now, burst, refill);
                b.tokens < burst
            });
        }
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        bucket.refill(now, burst, refill);
        if bucket.tokens > 0 {
            bucket.tokens -= 1;
            return Ok(());
        }
        // Empty: refill() left `last` within one period of `now`.
        let waited = now.duration_since(bucket.last).unwrap_or(Duration::ZERO);
        let wait = refill.saturating_sub(waited);
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Err(secs.max(1))
    }

    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

impl Bucket {
    fn refill(&mut self, now: SystemTime, burst: u32, refill: Duration) {
        if self.tokens >= burst || refill.is_zero() {
            self.tokens = burst;
            self.last = now;
            return;
        }
        let Ok(elapsed) = now.duration_since(self.last) else {
            // The clock went backwards: credit nothing and count from now on.
            self.last = now;
            return;
        };
        let periods = elapsed.as_nanos() / refill.as_nanos();
        let missing = burst - self.tokens;
        if periods >= u128::from(missing) {
            self.tokens = burst;
            self.last = now;
            return;
        }
        // periods < missing <= u32::MAX, and periods * refill <= elapsed.
        let periods = u32::try_from(periods).unwrap_or(missing);
        self.tokens += periods;
        self.last = refill
            .checked_mul(periods)
            .and_then(|credited| self.last.checked_add(credited))
            .unwrap_or(now);
    }
}

/// The address a bucket is kept for.
pub(crate) fn source_key(source: IpAddr) -> IpAddr {
    match source.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = v6.to_bits() & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from_bits(prefix))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const REFILL: Duration = Duration::from_secs(6);

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    #[test]
    fn ipv6_sources_share_a_bucket_per_64_and_mapped_v4_counts_as_v4() {
        let mut limiter = RateLimiter::default();
        let now = t0();
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        assert!(limiter.take(a, now, 1, REFILL).is_ok());
        assert_eq!(limiter.take(b, now, 1, REFILL), Err(6));
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert!(limiter.take(v4, now, 1, REFILL).is_ok());
        assert!(limiter.take(mapped, now, 1, REFILL).is_err());
        let other: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 3, 0, 0, 0, 1));
        assert!(limiter.take(other, now, 1, REFILL).is_ok());
    }

    #[test]
    fn retry_after_counts_down_and_clock_going_back_grants_nothing() {
        let mut limiter = RateLimiter::default();
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let now = t0();
        assert!(limiter.take(ip, now, 1, REFILL).is_ok());
        assert_eq!(limiter.take(ip, now, 1, REFILL), Err(6));
        assert_eq!(
            limiter.take(ip, now + Duration::from_millis(2500), 1, REFILL),
            Err(4)
        );
        assert_eq!(
            limiter.take(ip, now - Duration::from_secs(3600), 1, REFILL),
            Err(6)
        );
    }

    #[test]
    fn refilled_sources_are_forgotten_when_many_are_tracked() {
        let mut limiter = RateLimiter::default();
        let now = t0();
        for i in 0..PRUNE_AT as u32 {
            let ip = IpAddr::V4(Ipv4Addr::from_bits(0x0a00_0000 + i));
            assert!(limiter.take(ip, now, 10, REFILL).is_ok());
        }
        assert_eq!(limiter.tracked(), PRUNE_AT);
        let later = now + REFILL;
        assert!(
            limiter
                .take(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), later, 10, REFILL)
                .is_ok()
        );
        assert_eq!(limiter.tracked(), 1);
    }
}
