//! Resource requests, capacity and the inventory that grants leases all-or-nothing.

use std::collections::BTreeMap;
use std::fmt;

/// What a stage (or, later, a worker instance) asks for. Granted whole or not at all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceRequest {
    /// Whole GPU devices, held exclusively.
    pub gpus: u32,
    /// A share of one device's memory, in bytes. Several shares fit on one device.
    pub gpu_memory: u64,
    /// CPU slots.
    pub cpu: u32,
    /// Named counted resources (e.g. `nvenc: 1`).
    pub counters: BTreeMap<String, u64>,
}

impl ResourceRequest {
    pub fn is_empty(&self) -> bool {
        self.gpus == 0 && self.gpu_memory == 0 && self.cpu == 0 && self.counters.values().all(|v| *v == 0)
    }

    pub fn uses_gpu(&self) -> bool {
        self.gpus > 0 || self.gpu_memory > 0
    }

    /// Checks that the request could ever be granted by `capacity`. A request that can never
    /// fit would wait forever, which is exactly the silent stall gpuflow exists to prevent.
    pub fn check_fits(&self, capacity: &Capacity) -> Result<(), RequestError> {
        if self.gpus > 0 && self.gpu_memory > 0 {
            return Err(RequestError::GpuAndGpuMemory);
        }
        if self.gpus as usize > capacity.gpus.len() {
            return Err(RequestError::TooManyGpus { asked: self.gpus, have: capacity.gpus.len() as u32 });
        }
        if self.gpu_memory > 0 {
            let largest = capacity.gpus.iter().map(|g| g.memory).max().unwrap_or(0);
            if self.gpu_memory > largest {
                return Err(RequestError::GpuMemoryTooLarge { asked: self.gpu_memory, largest });
            }
        }
        if self.cpu > capacity.cpu {
            return Err(RequestError::TooManyCpu { asked: self.cpu, have: capacity.cpu });
        }
        for (name, asked) in &self.counters {
            match capacity.counters.get(name) {
                None => return Err(RequestError::UnknownCounter { name: name.clone() }),
                Some(have) if asked > have => {
                    return Err(RequestError::CounterTooLarge { name: name.clone(), asked: *asked, have: *have });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("`gpu` (whole devices) and `gpu_memory` (a share of one device) cannot both be set; use one")]
    GpuAndGpuMemory,
    #[error("asks for {asked} whole GPU(s) but the inventory has {have}")]
    TooManyGpus { asked: u32, have: u32 },
    #[error("asks for {} of GPU memory but the largest device has {}", ByteSize(*asked), ByteSize(*largest))]
    GpuMemoryTooLarge { asked: u64, largest: u64 },
    #[error("asks for {asked} CPU slot(s) but the inventory has {have}")]
    TooManyCpu { asked: u32, have: u32 },
    #[error("asks for counter `{name}`, which is not declared under resources.counters")]
    UnknownCounter { name: String },
    #[error("asks for {asked} of counter `{name}` but its capacity is {have}")]
    CounterTooLarge { name: String, asked: u64, have: u64 },
}

/// Formats a byte count the way the config accepts it (`80GiB`, `512MiB`, `123B`).
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (unit, size) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        for (unit, size) in UNITS {
            if self.0 >= size {
                return write!(f, "{:.2}{unit}", self.0 as f64 / size as f64);
            }
        }
        write!(f, "{}B", self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuDevice {
    pub index: u32,
    pub memory: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    pub gpus: Vec<GpuDevice>,
    pub cpu: u32,
    pub counters: BTreeMap<String, u64>,
}

/// What was granted to one holder. Released exactly as granted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// Whole devices, by position in the inventory.
    pub gpus: Vec<u32>,
    /// `(device position, bytes)` for a memory share.
    pub gpu_memory: Option<(u32, u64)>,
    pub cpu: u32,
    pub counters: BTreeMap<String, u64>,
}

impl Grant {
    /// Device positions this grant touches, in order (for `CUDA_VISIBLE_DEVICES`).
    pub fn devices(&self) -> Vec<u32> {
        let mut devices = self.gpus.clone();
        if let Some((device, _)) = self.gpu_memory {
            devices.push(device);
        }
        devices
    }

    /// Whether this grant is exactly what `request` asked for.
    pub fn satisfies(&self, request: &ResourceRequest) -> bool {
        let counters_match =
            request.counters.iter().filter(|(_, v)| **v > 0).all(|(k, v)| self.counters.get(k) == Some(v))
                && self.counters.iter().all(|(k, v)| request.counters.get(k) == Some(v));
        self.gpus.len() == request.gpus as usize
            && self.gpu_memory.map(|(_, bytes)| bytes).unwrap_or(0) == request.gpu_memory
            && self.cpu == request.cpu
            && counters_match
    }
}

/// Capacity withheld from backfill for requests that have waited past the starvation bound.
/// Lives only for one scheduling pass.
#[derive(Clone, Debug, Default)]
pub struct Reservation {
    blocked_devices: Vec<bool>,
    cpu: u32,
    counters: BTreeMap<String, u64>,
}

impl Reservation {
    /// A default reservation blocks nothing, whatever the device count.
    fn blocked(&self, device: usize) -> bool {
        self.blocked_devices.get(device).copied().unwrap_or(false)
    }
}

/// Free and used capacity. The only place where leases are taken and returned.
#[derive(Clone, Debug)]
pub struct Inventory {
    capacity: Capacity,
    /// How much of each counter may be granted right now (at most its capacity). Lowered for
    /// counters whose units come and go, such as the ready instances of a worker pool.
    counters_available: BTreeMap<String, u64>,
    gpu_exclusive: Vec<bool>,
    gpu_memory_used: Vec<u64>,
    /// Memory the devices report in use by processes that hold no lease of ours (another
    /// program, or a killed process that has not let go yet). Never handed out.
    gpu_foreign: Vec<u64>,
    cpu_used: u32,
    counters_used: BTreeMap<String, u64>,
}

/// A snapshot of what is in use, for the API and for invariant checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub gpu_exclusive: Vec<bool>,
    pub gpu_memory_used: Vec<u64>,
    pub cpu: u32,
    pub counters: BTreeMap<String, u64>,
}

impl Inventory {
    pub fn new(capacity: Capacity) -> Self {
        let devices = capacity.gpus.len();
        let counters_used = capacity.counters.keys().map(|k| (k.clone(), 0)).collect();
        Inventory {
            counters_available: capacity.counters.clone(),
            capacity,
            gpu_exclusive: vec![false; devices],
            gpu_memory_used: vec![0; devices],
            gpu_foreign: vec![0; devices],
            cpu_used: 0,
            counters_used,
        }
    }

    pub fn capacity(&self) -> &Capacity {
        &self.capacity
    }

    pub fn usage(&self) -> Usage {
        Usage {
            gpu_exclusive: self.gpu_exclusive.clone(),
            gpu_memory_used: self.gpu_memory_used.clone(),
            cpu: self.cpu_used,
            counters: self.counters_used.clone(),
        }
    }

    /// True when nothing is leased.
    pub fn is_idle(&self) -> bool {
        self.cpu_used == 0
            && self.gpu_exclusive.iter().all(|e| !e)
            && self.gpu_memory_used.iter().all(|m| *m == 0)
            && self.counters_used.values().all(|v| *v == 0)
    }

    pub fn new_reservation(&self) -> Reservation {
        Reservation { blocked_devices: vec![false; self.capacity.gpus.len()], ..Reservation::default() }
    }

    fn device_fully_free(&self, d: usize, reserved: &Reservation) -> bool {
        !self.gpu_exclusive[d] && self.gpu_memory_used[d] == 0 && self.gpu_foreign[d] == 0 && !reserved.blocked(d)
    }

    fn device_memory_free(&self, d: usize, reserved: &Reservation) -> Option<u64> {
        if self.gpu_exclusive[d] || reserved.blocked(d) {
            return None;
        }
        Some(self.capacity.gpus[d].memory.saturating_sub(self.gpu_memory_used[d] + self.gpu_foreign[d]))
    }

    /// Sets the foreign memory on a device (from its latest reading). Returns whether less is
    /// foreign than before, so waiting work may fit now.
    pub fn set_foreign(&mut self, device: usize, bytes: u64) -> bool {
        let Some(slot) = self.gpu_foreign.get_mut(device) else { return false };
        let freed = bytes < *slot;
        *slot = bytes;
        freed
    }

    pub fn foreign(&self) -> &[u64] {
        &self.gpu_foreign
    }

    fn cpu_free(&self, reserved: &Reservation) -> u32 {
        self.capacity.cpu - self.cpu_used - reserved.cpu.min(self.capacity.cpu - self.cpu_used)
    }

    fn counter_free(&self, name: &str, reserved: &Reservation) -> u64 {
        let available = self.counters_available.get(name).copied().unwrap_or(0);
        let used = self.counters_used.get(name).copied().unwrap_or(0);
        // Availability may drop below what is in use (a busy pool instance died): nothing is free.
        let free = available.saturating_sub(used);
        free - reserved.counters.get(name).copied().unwrap_or(0).min(free)
    }

    /// Sets how much of a declared counter may be granted now, clamped to its capacity.
    /// Returns whether more became available.
    pub fn set_counter_available(&mut self, name: &str, available: u64) -> bool {
        let Some(cap) = self.capacity.counters.get(name) else { return false };
        let available = available.min(*cap);
        let before = self.counters_available.insert(name.to_string(), available).unwrap_or(0);
        available > before
    }

    /// Changes a counter's capacity (a worker pool resized). Availability is clamped to it.
    pub fn set_counter_capacity(&mut self, name: &str, capacity: u64) {
        self.capacity.counters.insert(name.to_string(), capacity);
        self.counters_used.entry(name.to_string()).or_insert(0);
        let available = self.counters_available.entry(name.to_string()).or_insert(0);
        *available = (*available).min(capacity);
    }

    /// Grants the whole request, or nothing. Capacity held by `reserved` is not handed out.
    pub fn try_grant(&mut self, request: &ResourceRequest, reserved: &Reservation) -> Option<Grant> {
        self.try_grant_on(request, reserved, None)
    }

    /// Like `try_grant`, with any GPU part placed on `device` when one is given.
    pub fn try_grant_on(
        &mut self,
        request: &ResourceRequest,
        reserved: &Reservation,
        device: Option<u32>,
    ) -> Option<Grant> {
        if request.cpu > self.cpu_free(reserved) {
            return None;
        }
        for (name, asked) in &request.counters {
            if *asked > self.counter_free(name, reserved) {
                return None;
            }
        }
        let devices = self.capacity.gpus.len();
        let allowed = |d: usize| device.is_none_or(|only| only as usize == d);
        let whole: Vec<u32> = (0..devices)
            .filter(|d| allowed(*d) && self.device_fully_free(*d, reserved))
            .take(request.gpus as usize)
            .map(|d| d as u32)
            .collect();
        if whole.len() < request.gpus as usize {
            return None;
        }
        let mut share = None;
        if request.gpu_memory > 0 {
            // Best fit: the device left with the least free memory, to keep big holes for big asks.
            let best = (0..devices)
                .filter(|d| allowed(*d))
                .filter_map(|d| self.device_memory_free(d, reserved).map(|free| (d, free)))
                .filter(|(_, free)| *free >= request.gpu_memory)
                .min_by_key(|(d, free)| (*free, *d));
            share = Some((best?.0 as u32, request.gpu_memory));
        }
        // Everything fits: take it all at once.
        for d in &whole {
            self.gpu_exclusive[*d as usize] = true;
        }
        if let Some((d, bytes)) = share {
            self.gpu_memory_used[d as usize] += bytes;
        }
        self.cpu_used += request.cpu;
        let mut counters = BTreeMap::new();
        for (name, asked) in &request.counters {
            if *asked > 0 {
                *self.counters_used.get_mut(name).expect("checked above") += asked;
                counters.insert(name.clone(), *asked);
            }
        }
        Some(Grant { gpus: whole, gpu_memory: share, cpu: request.cpu, counters })
    }

    /// Returns a grant. Every lease comes back through here exactly once.
    pub fn release(&mut self, grant: &Grant) {
        for d in &grant.gpus {
            debug_assert!(self.gpu_exclusive[*d as usize], "released a device that was not held");
            self.gpu_exclusive[*d as usize] = false;
        }
        if let Some((d, bytes)) = grant.gpu_memory {
            let used = &mut self.gpu_memory_used[d as usize];
            debug_assert!(*used >= bytes, "released more GPU memory than held");
            *used = used.saturating_sub(bytes);
        }
        debug_assert!(self.cpu_used >= grant.cpu, "released more CPU than held");
        self.cpu_used = self.cpu_used.saturating_sub(grant.cpu);
        for (name, n) in &grant.counters {
            if let Some(used) = self.counters_used.get_mut(name) {
                debug_assert!(*used >= *n, "released more of a counter than held");
                *used = used.saturating_sub(*n);
            }
        }
    }

    /// How much of a counter may be granted now (in use included).
    pub fn counter_available(&self, name: &str) -> u64 {
        self.counters_available.get(name).copied().unwrap_or(0)
    }

    /// Withholds, for a request that has waited too long, everything it asks for that is free
    /// now, and stops new grants on every device it could land on. What it needs then only
    /// accumulates as leases return, so it cannot be starved by a stream of smaller requests.
    ///
    /// Returns whether it withheld anything that was not withheld already. Within one pass free
    /// capacity only shrinks, so once reserving a request changes nothing, reserving the same
    /// request again later in that pass changes nothing either.
    pub fn reserve(&self, request: &ResourceRequest, reserved: &mut Reservation) -> bool {
        let mut changed = false;
        let cpu = request.cpu.min(self.cpu_free(reserved));
        reserved.cpu += cpu;
        changed |= cpu > 0;
        for (name, asked) in &request.counters {
            let take = (*asked).min(self.counter_free(name, reserved));
            if take > 0 {
                *reserved.counters.entry(name.clone()).or_default() += take;
                changed = true;
            }
        }
        // Whole devices block every device; a memory share blocks each device it could land on.
        for (gpu, blocked) in self.capacity.gpus.iter().zip(reserved.blocked_devices.iter_mut()) {
            let block = request.gpus > 0 || (request.gpu_memory > 0 && gpu.memory >= request.gpu_memory);
            if block && !*blocked {
                *blocked = true;
                changed = true;
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn capacity(gpus: &[u64], cpu: u32) -> Capacity {
        Capacity {
            gpus: gpus.iter().enumerate().map(|(i, m)| GpuDevice { index: i as u32, memory: *m }).collect(),
            cpu,
            counters: BTreeMap::from([("nvenc".to_string(), 2)]),
        }
    }

    #[test]
    fn two_memory_shares_fit_one_device_and_a_third_waits() {
        let mut inv = Inventory::new(capacity(&[80 * GIB], 4));
        let none = inv.new_reservation();
        let req = ResourceRequest { gpu_memory: 40 * GIB, ..Default::default() };
        let a = inv.try_grant(&req, &none).expect("first fits");
        let b = inv.try_grant(&req, &none).expect("second fits");
        assert_eq!(a.gpu_memory, Some((0, 40 * GIB)));
        assert_eq!(b.gpu_memory, Some((0, 40 * GIB)));
        assert!(inv.try_grant(&req, &none).is_none());
        // A whole-device request cannot take a device that has shares on it.
        assert!(inv.try_grant(&ResourceRequest { gpus: 1, ..Default::default() }, &none).is_none());
        inv.release(&a);
        inv.release(&b);
        assert!(inv.is_idle());
    }

    #[test]
    fn grant_is_all_or_nothing() {
        let mut inv = Inventory::new(capacity(&[80 * GIB], 1));
        let none = inv.new_reservation();
        let gpu = inv.try_grant(&ResourceRequest { gpus: 1, ..Default::default() }, &none).unwrap();
        // CPU is free but the GPU is not: nothing at all may be taken.
        let both = ResourceRequest { gpu_memory: GIB, cpu: 1, ..Default::default() };
        assert!(inv.try_grant(&both, &none).is_none());
        assert_eq!(inv.usage().cpu, 0);
        inv.release(&gpu);
        assert!(inv.try_grant(&both, &none).is_some());
    }

    #[test]
    fn best_fit_keeps_the_big_hole() {
        let mut inv = Inventory::new(capacity(&[80 * GIB, 24 * GIB], 4));
        let none = inv.new_reservation();
        let g = inv.try_grant(&ResourceRequest { gpu_memory: 20 * GIB, ..Default::default() }, &none).unwrap();
        assert_eq!(g.gpu_memory, Some((1, 20 * GIB)));
    }

    #[test]
    fn reservation_blocks_backfill() {
        let mut inv = Inventory::new(capacity(&[80 * GIB], 4));
        let mut reserved = inv.new_reservation();
        let held = inv.try_grant(&ResourceRequest { gpu_memory: 10 * GIB, ..Default::default() }, &reserved).unwrap();
        inv.reserve(&ResourceRequest { gpus: 1, cpu: 2, ..Default::default() }, &mut reserved);
        assert!(inv.try_grant(&ResourceRequest { gpu_memory: GIB, ..Default::default() }, &reserved).is_none());
        assert!(inv.try_grant(&ResourceRequest { cpu: 3, ..Default::default() }, &reserved).is_none());
        assert!(inv.try_grant(&ResourceRequest { cpu: 2, ..Default::default() }, &reserved).is_some());
        inv.release(&held);
    }

    #[test]
    fn lowered_availability_stops_grants_even_below_use() {
        let mut inv = Inventory::new(capacity(&[], 4));
        let none = inv.new_reservation();
        let one = ResourceRequest { counters: BTreeMap::from([("nvenc".to_string(), 1)]), ..Default::default() };
        let held = inv.try_grant(&one, &none).unwrap();
        assert!(!inv.set_counter_available("nvenc", 0));
        assert!(inv.try_grant(&one, &none).is_none());
        inv.release(&held);
        assert!(inv.try_grant(&one, &none).is_none(), "nothing is available");
        assert!(inv.set_counter_available("nvenc", 5), "more became available (clamped to 2)");
        assert!(inv.try_grant(&one, &none).is_some());
        assert!(inv.try_grant(&one, &none).is_some());
        assert!(inv.try_grant(&one, &none).is_none(), "clamped to the capacity of 2");
    }

    #[test]
    fn foreign_memory_is_never_double_booked() {
        let mut inv = Inventory::new(capacity(&[80 * GIB], 4));
        let none = inv.new_reservation();
        inv.set_foreign(0, 60 * GIB);
        assert!(inv.try_grant(&ResourceRequest { gpu_memory: 40 * GIB, ..Default::default() }, &none).is_none());
        assert!(
            inv.try_grant(&ResourceRequest { gpus: 1, ..Default::default() }, &none).is_none(),
            "a device with foreign memory is not whole"
        );
        let small = inv.try_grant(&ResourceRequest { gpu_memory: 20 * GIB, ..Default::default() }, &none).unwrap();
        assert!(inv.set_foreign(0, 0), "released memory frees capacity");
        assert!(inv.try_grant(&ResourceRequest { gpu_memory: 40 * GIB, ..Default::default() }, &none).is_some());
        inv.release(&small);
    }

    #[test]
    fn pinned_grants_stay_on_their_device() {
        let mut inv = Inventory::new(capacity(&[80 * GIB, 80 * GIB], 4));
        let none = inv.new_reservation();
        let share = ResourceRequest { gpu_memory: 10 * GIB, ..Default::default() };
        assert_eq!(inv.try_grant_on(&share, &none, Some(1)).unwrap().gpu_memory, Some((1, 10 * GIB)));
        assert_eq!(inv.try_grant_on(&ResourceRequest { gpus: 1, ..Default::default() }, &none, Some(1)), None);
        assert_eq!(
            inv.try_grant_on(&ResourceRequest { gpus: 1, ..Default::default() }, &none, Some(0)).unwrap().gpus,
            vec![0]
        );
    }

    #[test]
    fn impossible_requests_are_refused_up_front() {
        let cap = capacity(&[24 * GIB], 2);
        let err = ResourceRequest { gpu_memory: 40 * GIB, ..Default::default() }.check_fits(&cap).unwrap_err();
        assert_eq!(err.to_string(), "asks for 40GiB of GPU memory but the largest device has 24GiB");
        assert!(ResourceRequest { gpus: 2, ..Default::default() }.check_fits(&cap).is_err());
        assert!(ResourceRequest { cpu: 3, ..Default::default() }.check_fits(&cap).is_err());
        let unknown = ResourceRequest { counters: BTreeMap::from([("x".into(), 1)]), ..Default::default() };
        assert!(matches!(unknown.check_fits(&cap), Err(RequestError::UnknownCounter { .. })));
    }
}
