//! Links and budgets: what a message costs on a device's network, and how many bytes fit a
//! time budget.
//!
//! A step's communication costs `T_c = latency + bytes / bandwidth`. Given a device's link
//! and the time it may spend communicating per step, [`NetworkProfile::bytes_within`] is
//! the largest message that fits; the adaptive threshold ([`crate::Target::Bytes`], the
//! streaming encoder's [`crate::StreamTarget::Bytes`]) then aims its messages at that size
//! and never exceeds it. A worse link gets fewer bytes, so its threshold `Wt` rises.
//!
//! Times are whole microseconds and bandwidths whole bits per second, so the arithmetic is
//! exact integer arithmetic and gives the same answer on every platform (no floating point
//! is linked on a microcontroller that uses it).

/// A device's link: the latency of one exchange and the bandwidth of its slower direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetworkProfile {
    /// Round-trip latency of one exchange, in microseconds.
    pub latency_us: u64,
    /// Bandwidth in bits per second (> 0).
    pub bandwidth_bps: u64,
}

impl NetworkProfile {
    /// Two servers in one datacenter: 0.1 ms, 10 Gbit/s.
    pub const DATACENTER: NetworkProfile = NetworkProfile::new(100, 10_000_000_000);
    /// A home uplink over Wi-Fi: 15 ms, 20 Mbit/s.
    pub const HOME_WIFI: NetworkProfile = NetworkProfile::new(15_000, 20_000_000);
    /// A phone's LTE uplink: 50 ms, 5 Mbit/s.
    pub const LTE: NetworkProfile = NetworkProfile::new(50_000, 5_000_000);
    /// A LoRa-class radio (LoRaWAN at a fast spreading factor, with its receive windows):
    /// 1 s, 5 kbit/s.
    pub const LORA: NetworkProfile = NetworkProfile::new(1_000_000, 5_000);
    /// Across continents (Shanghai to Boston, the round trip at the speed of light in
    /// fibre): 78 ms, 100 Mbit/s.
    pub const INTERCONTINENTAL: NetworkProfile = NetworkProfile::new(78_000, 100_000_000);

    /// The named presets, in the order above.
    pub const PRESETS: [(&'static str, NetworkProfile); 5] = [
        ("datacenter", Self::DATACENTER),
        ("home-wifi", Self::HOME_WIFI),
        ("lte", Self::LTE),
        ("lora", Self::LORA),
        ("intercontinental", Self::INTERCONTINENTAL),
    ];

    /// A link of `latency_us` microseconds and `bandwidth_bps` bits per second.
    pub const fn new(latency_us: u64, bandwidth_bps: u64) -> Self {
        NetworkProfile {
            latency_us,
            bandwidth_bps,
        }
    }

    /// The preset called `name` (see [`NetworkProfile::PRESETS`]).
    pub fn preset(name: &str) -> Option<NetworkProfile> {
        Self::PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, p)| p)
    }

    /// `T_c` of one exchange carrying `bytes`, in microseconds, rounded up; `u64::MAX` on
    /// a link without bandwidth.
    pub fn comm_time_us(&self, bytes: u64) -> u64 {
        if self.bandwidth_bps == 0 {
            return u64::MAX;
        }
        let transfer = (bytes as u128 * 8_000_000).div_ceil(self.bandwidth_bps as u128);
        let total = self.latency_us as u128 + transfer;
        total.min(u64::MAX as u128) as u64
    }

    /// The most bytes one exchange can carry within `budget_us`: `comm_time_us` of the
    /// result is at most the budget. 0 when the latency alone exceeds it.
    pub fn bytes_within(&self, budget_us: u64) -> u64 {
        let spare = budget_us.saturating_sub(self.latency_us) as u128;
        let bytes = spare * self.bandwidth_bps as u128 / 8_000_000;
        bytes.min(u64::MAX as u128) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::NetworkProfile;

    #[test]
    fn hand_computed_times_and_budgets() {
        let p = NetworkProfile::INTERCONTINENTAL;
        // 78 ms + 1 MB at 100 Mbit/s (80 ms).
        assert_eq!(p.comm_time_us(1_000_000), 158_000);
        // 100 ms leaves 22 ms for data: 22e-3 s · 12.5e6 B/s.
        assert_eq!(p.bytes_within(100_000), 275_000);
        assert_eq!(p.bytes_within(78_000), 0);
        assert_eq!(p.bytes_within(1), 0);
        // 5 kbit/s: one byte is 1.6 ms.
        assert_eq!(NetworkProfile::LORA.comm_time_us(1), 1_001_600);
        assert_eq!(NetworkProfile::LORA.bytes_within(2_000_000), 625);
        assert_eq!(NetworkProfile::preset("lte"), Some(NetworkProfile::LTE));
        assert_eq!(NetworkProfile::preset("dial-up"), None);
        assert_eq!(NetworkProfile::new(5, 0).comm_time_us(1), u64::MAX);
        assert_eq!(NetworkProfile::new(5, 0).bytes_within(u64::MAX), 0);
    }

    #[test]
    fn the_bytes_within_a_budget_fit_it_and_one_more_does_not() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = NetworkProfile::new(x % 2_000_000, 1 + (x >> 20) % 20_000_000_000);
            let budget = (x >> 3) % 10_000_000;
            let b = p.bytes_within(budget);
            if budget >= p.latency_us {
                assert!(p.comm_time_us(b) <= budget, "{p:?} {budget} {b}");
                assert!(p.comm_time_us(b + 1) > budget, "{p:?} {budget} {b}");
            } else {
                assert_eq!(b, 0);
            }
        }
    }
}
