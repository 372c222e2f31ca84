//! `loft bench queue`: enqueue + claim + complete throughput of Loft's queue against Huey's
//! SqliteHuey (Python) on the same machine in the same run, printed as ratios.
//!
//! Both sides do the same work per job on a fresh SQLite file in WAL mode: one transaction to
//! enqueue, one to take the next job, one to record its end. Loft's claim and end also write their
//! state-change events (the rows the dashboard streams); Huey's `execute` stores the task's result.
//! SQLite's `synchronous` setting dominates the cost, so the pairs compared use the same setting:
//! NORMAL (Loft's: no fsync per commit in WAL, never corrupts) and OFF (Huey's `fsync=False`).
//! Huey's out-of-the-box setting (FULL: an fsync per commit) is printed for reference.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::jobs::queue::{self, RunEnd};
use crate::db::Db;

const HUEY_SCRIPT: &str = r#"
import json, sys, time
import huey
from huey import SqliteHuey
from huey.storage import SqliteStorage

class NormalSync(SqliteStorage):
    """SQLite synchronous=NORMAL, the setting Loft uses (Huey offers FULL or OFF)."""
    def _create_connection(self):
        conn = super()._create_connection()
        conn.execute("pragma synchronous=1")
        return conn

n, path, sync = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if sync == "normal":
    h = SqliteHuey(filename=path, storage_class=NormalSync)
else:
    h = SqliteHuey(filename=path, fsync={"full": None, "off": False}[sync])

@h.task()
def job(i):
    return i

t0 = time.perf_counter()
for i in range(n):
    job(i)
t1 = time.perf_counter()
done = 0
while True:
    task = h.dequeue()
    if task is None:
        break
    h.execute(task)
    done += 1
t2 = time.perf_counter()
print(json.dumps({"enqueue_s": t1 - t0, "consume_s": t2 - t1, "done": done, "version": huey.__version__}))
"#;

pub struct Measured {
    pub jobs: usize,
    pub enqueue_s: f64,
    pub consume_s: f64,
}

impl Measured {
    pub fn per_sec(&self) -> f64 {
        self.jobs as f64 / (self.enqueue_s + self.consume_s)
    }
}

fn scratch_dir() -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
    let dir = std::env::temp_dir().join(format!("loft-bench-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Loft's queue on a fresh database: `jobs` enqueues, then claim + complete until empty.
/// `sync_off` sets synchronous=OFF (for the comparison with Huey's `fsync=False`).
pub fn measure_loft(dir: &Path, jobs: usize, sync_off: bool) -> Result<Measured> {
    let file = dir.join(if sync_off { "loft-off.db" } else { "loft.db" });
    let db = Db::open(&file)?;
    let mut conn = db.conn();
    if sync_off {
        conn.execute_batch("PRAGMA synchronous=OFF")?;
    }
    let config = json!({ "network_dim": 8, "learning_rate": 0.0001 }).as_object().expect("object").clone();
    let t0 = Instant::now();
    for i in 0..jobs {
        queue::enqueue(&mut conn, &format!("job {i}"), &config, 0, 3)?;
    }
    let enqueue_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut done = 0;
    while let Some(claim) = queue::claim(&mut conn, "bench", 60_000)? {
        let end = RunEnd::Done { final_step: 1, network_file: None, cancelled: false };
        queue::finish(&mut conn, claim.job_id, &claim.lease, &end)?;
        done += 1;
    }
    let consume_s = t1.elapsed().as_secs_f64();
    if done != jobs {
        bail!("Loft's queue completed {done} of {jobs} jobs");
    }
    Ok(Measured { jobs, enqueue_s, consume_s })
}

/// Huey's SqliteHuey through `python`; `sync` is "normal", "off" or "full" (Huey's default).
pub fn measure_huey(python: &Path, dir: &Path, jobs: usize, sync: &str) -> Result<(Measured, String)> {
    let script = dir.join("huey_bench.py");
    std::fs::write(&script, HUEY_SCRIPT)?;
    let db = dir.join(format!("huey-{sync}.db"));
    let out = Command::new(python)
        .arg(&script)
        .arg(jobs.to_string())
        .arg(&db)
        .arg(sync)
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("python failed"));
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("reading the Huey benchmark's output")?;
    let m = Measured { jobs, enqueue_s: v["enqueue_s"].as_f64().unwrap_or(f64::NAN), consume_s: v["consume_s"].as_f64().unwrap_or(f64::NAN) };
    if v["done"].as_u64() != Some(jobs as u64) {
        bail!("Huey completed {} of {jobs} tasks", v["done"]);
    }
    Ok((m, v["version"].as_str().unwrap_or("?").to_string()))
}

/// The Python to run Huey with: `--python`, else `.venv-bench/bin/python` in the current folder.
fn find_python(given: Option<PathBuf>) -> Option<PathBuf> {
    given.or_else(|| {
        let p = PathBuf::from(".venv-bench/bin/python");
        p.is_file().then_some(p)
    })
}

fn line(name: &str, m: &Measured) {
    println!(
        "  {name:<42} {:>7.0} jobs/s   (enqueue {:>6.1} µs/job, claim+complete {:>6.1} µs/job)",
        m.per_sec(),
        m.enqueue_s / m.jobs as f64 * 1e6,
        m.consume_s / m.jobs as f64 * 1e6
    );
}

pub fn run(jobs: usize, python: Option<PathBuf>) -> Result<()> {
    let dir = scratch_dir()?;
    let result = (|| -> Result<()> {
        println!("Queue benchmark: {jobs} jobs, enqueue + claim + complete, each its own transaction, on {}", dir.display());
        let loft_normal = measure_loft(&dir, jobs, false)?;
        line("Loft, synchronous=NORMAL (its setting)", &loft_normal);
        let loft_off = measure_loft(&dir, jobs, true)?;
        line("Loft, synchronous=OFF", &loft_off);
        let Some(python) = find_python(python) else {
            println!("Huey: skipped: no Python with huey found. Create it with:");
            println!("    python3 -m venv .venv-bench && .venv-bench/bin/pip install huey");
            println!("  then run `loft bench queue` from that folder (or pass --python PATH).");
            return Ok(());
        };
        let mut ratios = Vec::new();
        for (sync, label, loft) in [("normal", "synchronous=NORMAL", &loft_normal), ("off", "synchronous=OFF (fsync=False)", &loft_off), ("full", "synchronous=FULL (Huey's default)", &loft_normal)] {
            match measure_huey(&python, &dir, jobs, sync) {
                Ok((huey, version)) => {
                    line(&format!("Huey {version} SqliteHuey, {label}"), &huey);
                    let vs = if sync == "full" { "Loft NORMAL / Huey default" } else { label.split(' ').next().unwrap_or(label) };
                    ratios.push(format!("{:.2}× ({vs})", loft.per_sec() / huey.per_sec()));
                }
                Err(e) => {
                    println!("Huey: skipped: {e:#}");
                    println!("  (install it with: python3 -m venv .venv-bench && .venv-bench/bin/pip install huey)");
                    return Ok(());
                }
            }
        }
        println!("Loft / Huey throughput: {}", ratios.join(", "));
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
