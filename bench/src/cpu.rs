//! Where a measurement's CPU went: this process (the server, which runs in it, and the
//! clients; or the peer), the children it has waited for (`pgbench`), PostgreSQL's
//! processes, and what the machine left idle. Read from Linux's `/proc` before and after,
//! so that a throughput can be told apart from the CPU it took: on a machine that has no
//! idle CPU left, more commands a second needs less CPU a command.

use std::fs;
use std::time::Duration;

/// The unit of `/proc`'s CPU times: `USER_HZ`, 100 on every Linux architecture.
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU times at the start of a measurement.
pub struct CpuMeter {
    postmaster: u32,
    process: u64,
    postgres: u64,
    machine: Machine,
}

/// What a measurement used.
#[derive(Debug, Clone, Copy)]
pub struct CpuUse {
    /// This process and its waited-for children.
    pub process: Duration,
    /// Every PostgreSQL process: the postmaster, its children alive at either end, and the
    /// ones that ended in between (counted in the postmaster's children's times).
    pub postgres: Duration,
    /// The share of the machine's CPU time left idle (waiting for the disk included).
    pub idle: f64,
    /// Of that, the share Linux counts as waiting for the disk (`iowait`: a core with
    /// nothing to run while a task that last ran on it waits for a read or a write, such
    /// as a commit's flush). The rest of the idle time nobody was waiting for the disk on
    /// that core: the work waited for another core, or for a wake-up.
    pub disk_wait: f64,
}

impl CpuUse {
    /// Both parts, per operation.
    pub fn per_op(&self, ops: f64) -> Duration {
        (self.process + self.postgres).div_f64(ops.max(1.0))
    }

    /// PostgreSQL's part, per operation.
    pub fn postgres_per_op(&self, ops: f64) -> Duration {
        self.postgres.div_f64(ops.max(1.0))
    }
}

impl CpuMeter {
    /// Starts counting; `postmaster` is the pid of PostgreSQL's postmaster (see
    /// [`postmaster_of`]). `None` where `/proc` cannot be read.
    pub fn start(postmaster: u32) -> Option<Self> {
        Some(Self {
            postmaster,
            process: process_ticks("self")?,
            postgres: postgres_ticks(postmaster)?,
            machine: Machine::read()?,
        })
    }

    pub fn stop(self) -> Option<CpuUse> {
        let process = process_ticks("self")?.saturating_sub(self.process);
        let postgres = postgres_ticks(self.postmaster)?.saturating_sub(self.postgres);
        let machine = Machine::read()?;
        let total = machine.total.saturating_sub(self.machine.total);
        let idle = machine.idle.saturating_sub(self.machine.idle);
        let disk_wait = machine.iowait.saturating_sub(self.machine.iowait);
        Some(CpuUse {
            process: ticks(process),
            postgres: ticks(postgres),
            idle: idle as f64 / total.max(1) as f64,
            disk_wait: disk_wait as f64 / total.max(1) as f64,
        })
    }
}

/// The postmaster's pid: the parent of the backend serving `pool`.
pub async fn postmaster_of(pool: &sqlx::PgPool) -> anyhow::Result<u32> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await?;
    let stat = Stat::read(&backend.to_string())
        .ok_or_else(|| anyhow::anyhow!("cannot read /proc/{backend}/stat"))?;
    Ok(stat.parent)
}

fn ticks(n: u64) -> Duration {
    Duration::from_secs_f64(n as f64 / TICKS_PER_SECOND)
}

/// The fields of `/proc/<pid>/stat` used here.
struct Stat {
    parent: u32,
    /// User and system time.
    own: u64,
    /// User and system time of the children it has waited for.
    children: u64,
}

impl Stat {
    fn read(pid: &str) -> Option<Self> {
        Self::parse(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    fn parse(text: &str) -> Option<Self> {
        // The command name, in brackets, may hold spaces: the fields counted here come
        // after its closing bracket, from the state (the third field) on.
        let rest = text.get(text.rfind(')')? + 2..)?;
        let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Self {
            parent: u32::try_from(field(4)?).ok()?,
            own: field(14)? + field(15)?,
            children: field(16)? + field(17)?,
        })
    }
}

fn process_ticks(pid: &str) -> Option<u64> {
    let stat = Stat::read(pid)?;
    Some(stat.own + stat.children)
}

/// The postmaster's own and waited-for children's times, and those of its children alive
/// now. A child that ends between two readings moves from the second part to the first
/// with all its time, so the difference of two readings counts it once.
fn postgres_ticks(postmaster: u32) -> Option<u64> {
    let mut total = process_ticks(&postmaster.to_string())?;
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // A process may end while this reads.
        if let Some(stat) = Stat::read(pid)
            && stat.parent == postmaster
        {
            total += stat.own;
        }
    }
    Some(total)
}

/// The machine's CPU time in all, idle, and of that waiting for the disk (`/proc/stat`'s
/// first line).
#[derive(Clone, Copy)]
struct Machine {
    total: u64,
    idle: u64,
    iowait: u64,
}

impl Machine {
    fn read() -> Option<Self> {
        let text = fs::read_to_string("/proc/stat").ok()?;
        let line = text.lines().next()?;
        let values: Vec<u64> = line
            .split_ascii_whitespace()
            .skip(1)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        // user, nice, system, idle, iowait, irq, softirq, steal; guest time is counted
        // in user time already.
        let total = values.iter().take(8).sum();
        let iowait = *values.get(4)?;
        let idle = values.get(3)? + iowait;
        Some(Self {
            total,
            idle,
            iowait,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Stat;

    #[test]
    fn a_process_stat_line_is_read_after_its_command_name_whatever_brackets_and_spaces_that_holds()
    {
        let line = "4242 (postgres: a (b) c) S 17 4242 4242 0 -1 4194560 900 0 0 0 \
                    250 36 12 7 20 0 1 0 123 1000 200 18446744073709551615";
        let stat = Stat::parse(line).expect("parsed");
        assert_eq!(stat.parent, 17);
        assert_eq!(stat.own, 250 + 36);
        assert_eq!(stat.children, 12 + 7);
        assert!(Stat::parse("4242 (cut short) S 17").is_none());
        assert!(Stat::parse("4242 (cut)").is_none());
    }

    #[test]
    fn this_process_and_the_machine_can_be_read() {
        assert!(super::process_ticks("self").is_some());
        assert!(super::Machine::read().is_some_and(|m| m.total >= m.idle && m.idle >= m.iowait));
    }
}
