//! How fast the machine is in this sitting, measured beside `all`'s figures so that two
//! sittings can be told apart from two builds: a commit's flush of the log is the floor of
//! a durable command's latency, and the ratios move with the share of CPU each side needs.
//! - the flush: 8 KiB written in sequence to a preallocated 16 MiB file and `fdatasync`ed,
//!   as PostgreSQL writes and flushes its write-ahead log (its default `wal_sync_method`
//!   on Linux), in the server's data directory (the same file system as the log);
//! - the CPU: a fixed loop of integer arithmetic on one thread.

use std::fs::OpenOptions;
use std::hint::black_box;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

const BLOCK: usize = 8 * 1024;
const FILE: u64 = 16 * 1024 * 1024;

/// Latencies of `fdatasync` after an 8 KiB write, sorted, taken for about `duration`
/// (at most 10,000).
pub fn flush_latencies(dir: &Path, duration: Duration) -> io::Result<Vec<Duration>> {
    let path = dir.join("calibrate-flush");
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let zeros = vec![0u8; 1024 * 1024];
    for i in 0..FILE / zeros.len() as u64 {
        file.write_all_at(&zeros, i * zeros.len() as u64)?;
    }
    file.sync_all()?;
    let block = vec![0x5au8; BLOCK];
    let mut times = Vec::new();
    let began = Instant::now();
    let mut offset = 0;
    while began.elapsed() < duration && times.len() < 10_000 {
        let t = Instant::now();
        file.write_all_at(&block, offset)?;
        file.sync_data()?;
        times.push(t.elapsed());
        offset = (offset + BLOCK as u64) % FILE;
    }
    drop(file);
    std::fs::remove_file(&path)?;
    times.sort();
    Ok(times)
}

/// The time one thread takes for a fixed amount of integer work (262 ms on the machine
/// of BENCHMARKS.md).
pub fn cpu_loop() -> Duration {
    let began = Instant::now();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut sum: u64 = 0;
    for _ in 0..100_000_000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        sum = sum.wrapping_add(black_box(x) % 1_000_003);
    }
    black_box(sum);
    began.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flush_measure_times_each_flush_and_leaves_no_file_behind() {
        let dir = std::env::temp_dir().join(format!("calibrate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let times = flush_latencies(&dir, Duration::from_millis(50)).unwrap();
        assert!(!times.is_empty());
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "sorted");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir(&dir).unwrap();
    }
}
