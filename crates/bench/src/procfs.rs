//! What the bench reads about processes from Linux's /proc, and the one
//! process limit it raises.
//!
//! The server under test is measured from outside, as an operator would:
//! CPU seconds from `/proc/PID/stat` (utime + stime) and memory from
//! `/proc/PID/status` (VmRSS, VmHWM). Parsing is split from reading so it
//! can be tested on fixed text. This module never signals or changes another
//! process.

use serde::{Deserialize, Serialize};

/// One look at a process.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// User + system CPU time so far, in seconds.
    pub cpu_s: f64,
    /// Resident set size now, and its peak, in bytes.
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
    pub threads: u64,
}

/// utime + stime from the text of `/proc/PID/stat`, in clock ticks. The
/// command name (field 2) is in parentheses and may hold spaces or
/// parentheses itself, so fields are counted from the last `)`.
pub fn parse_stat_ticks(text: &str) -> Option<u64> {
    let after = &text[text.rfind(')')? + 1..];
    let mut fields = after.split_ascii_whitespace();
    // After the name come field 3 (state) .. ; utime is field 14, stime 15.
    let utime: u64 = fields.nth(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// (VmRSS, VmHWM, Threads) from the text of `/proc/PID/status`; sizes in
/// bytes.
pub fn parse_status(text: &str) -> Option<(u64, u64, u64)> {
    let mut rss = None;
    let mut hwm = None;
    let mut threads = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let number = || -> Option<u64> { value.split_ascii_whitespace().next()?.parse().ok() };
        match key {
            "VmRSS" => rss = number().map(|kb| kb * 1024),
            "VmHWM" => hwm = number().map(|kb| kb * 1024),
            "Threads" => threads = number(),
            _ => {}
        }
    }
    Some((rss?, hwm?, threads.unwrap_or(0)))
}

/// Clock ticks per second, for `/proc/PID/stat` times.
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// Reads a process's CPU time and memory; `None` once it is gone.
pub fn sample(pid: u32) -> Option<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let ticks = parse_stat_ticks(&stat)?;
    let (rss_bytes, hwm_bytes, threads) = parse_status(&status)?;
    Some(Sample {
        cpu_s: ticks as f64 / ticks_per_second() as f64,
        rss_bytes,
        hwm_bytes,
        threads,
    })
}

/// Raises this process's open-file soft limit towards `want` (never above
/// the hard limit), so that it and the children it starts can hold their
/// sockets. Returns the soft limit in force afterwards.
// rlim_t is u64 here but not on every platform libc supports.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let target = (want as libc::rlim_t).min(lim.rlim_max);
        if target > lim.rlim_cur {
            let raised = libc::rlimit {
                rlim_cur: target,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return target as u64;
            }
        }
    }
    lim.rlim_cur as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from a real guildchat server, with a name made hostile.
    const STAT: &str = "4242 (guild chat) (x)) S 1 4242 4242 0 -1 4194560 2812 0 0 0 \
        1234 567 0 0 20 0 3 0 98765 123456789 4321 18446744073709551615 1 1 0 0 0 0 0 \
        4096 17610 0 0 0 17 1 0 0 0 0 0";

    const STATUS: &str = "Name:\tguildchat\nUmask:\t0022\nState:\tS (sleeping)\n\
        VmPeak:\t  812345 kB\nVmSize:\t  812345 kB\nVmHWM:\t   40960 kB\n\
        VmRSS:\t   20480 kB\nRssAnon:\t   10000 kB\nThreads:\t3\n";

    #[test]
    fn stat_times_are_utime_plus_stime() {
        assert_eq!(parse_stat_ticks(STAT), Some(1234 + 567));
        assert_eq!(parse_stat_ticks("1 (x) S 1 2"), None);
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn status_sizes_are_bytes() {
        assert_eq!(parse_status(STATUS), Some((20480 * 1024, 40960 * 1024, 3)));
        assert_eq!(parse_status("Name:\tx\n"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let me = sample(std::process::id()).unwrap();
        assert!(me.rss_bytes > 0 && me.hwm_bytes >= me.rss_bytes, "{me:?}");
        assert!(me.threads >= 1);
    }
}
