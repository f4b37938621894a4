//! The process's own figures, read from `/proc/self` (Linux only, like the
//! server). Read on a blocking-offload thread: they are file reads.

use std::time::Duration;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessFigures {
    pub resident_bytes: u64,
    pub cpu_seconds: f64,
    pub open_fds: u64,
    pub max_fds: u64,
}

/// Reads the figures; what cannot be read is left at 0.
pub fn read() -> ProcessFigures {
    let mut figures = ProcessFigures::default();
    // SAFETY: sysconf has no preconditions.
    let (page, ticks) = unsafe { (libc::sysconf(libc::_SC_PAGESIZE), libc::sysconf(libc::_SC_CLK_TCK)) };
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        if let Some(pages) = statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()) {
            figures.resident_bytes = pages.saturating_mul(page.max(0) as u64);
        }
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may contain spaces), from
        // field 3 on; utime and stime are fields 14 and 15.
        if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            if ticks > 0 {
                let total = tick(11) + tick(12);
                figures.cpu_seconds = Duration::from_secs_f64(total as f64 / ticks as f64).as_secs_f64();
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        figures.open_fds = dir.count() as u64;
    }
    if let Ok((soft, _)) = rlimit::Resource::NOFILE.get() {
        figures.max_fds = soft;
    }
    figures
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_has_memory_cpu_and_descriptors() {
        let f = super::read();
        assert!(f.resident_bytes > 1 << 20, "{f:?}");
        assert!(f.open_fds >= 3, "{f:?}");
        assert!(f.max_fds >= f.open_fds, "{f:?}");
        assert!(f.cpu_seconds >= 0.0);
    }
}
