//! The GPUs of this machine and which sessions hold them.
//!
//! The inventory comes from a configured count or from `nvidia-smi` (found on `PATH`). Sessions take
//! device indices through [`GpuInventory::assign`] and give them back when their [`GpuLease`] drops,
//! so a lease cannot leak on an early return.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Result, RunnerError};

/// The `nvidia-smi` query the inventory is read with (CSV, no header).
pub const NVIDIA_SMI_ARGS: [&str; 2] = [
    "--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu",
    "--format=csv,noheader",
];

/// How long `nvidia-smi` may take before the runner gives up on it (a wedged driver can hang it).
const NVIDIA_SMI_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the runner learns how many GPUs it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSource {
    /// A fixed number of GPUs, indices `0..n` (CPU-only machines and tests use `Count(0)`).
    Count(u32),
    /// Whatever `nvidia-smi` on `PATH` lists; no `nvidia-smi` means no GPUs.
    Auto,
    /// Exactly these GPUs, by index: those a cluster scheduler allocated to the job the runner runs in.
    Ids(Vec<u32>),
}

impl GpuSource {
    /// The GPUs a list names: `none`, or comma-separated indices such as `0,1` (as `SLURM_JOB_GPUS` and
    /// `CUDA_VISIBLE_DEVICES` give them); an index named twice counts once.
    pub fn ids(list: &str) -> Result<Self> {
        let mut ids = Vec::new();
        if list.trim() == "none" {
            return Ok(GpuSource::Ids(ids));
        }
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let id = item.parse::<u32>().map_err(|_| {
                RunnerError::GpuList(format!(
                    "the GPU list `{list}` names `{item}`, not a GPU index"
                ))
            })?;
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(GpuSource::Ids(ids))
    }

    /// The GPUs Slurm allocated to the job this process runs in: `SLURM_JOB_GPUS` (indices, e.g. `0,1`),
    /// else `CUDA_VISIBLE_DEVICES` as Slurm set it; none when the job was given no GPU.
    pub fn from_slurm_job(env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        match env("SLURM_JOB_GPUS")
            .or_else(|| env("SLURM_STEP_GPUS"))
            .or_else(|| env("CUDA_VISIBLE_DEVICES"))
        {
            Some(list) => Self::ids(&list),
            None => Ok(GpuSource::Ids(Vec::new())),
        }
    }
}

/// One GPU as `nvidia-smi` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// The index `CUDA_VISIBLE_DEVICES` uses (with `CUDA_DEVICE_ORDER=PCI_BUS_ID`) and `/dev/nvidiaN`.
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_total_mib: Option<u64>,
    pub memory_used_mib: Option<u64>,
    pub utilization_percent: Option<u32>,
}

impl GpuInfo {
    fn numbered(index: u32) -> Self {
        Self {
            index,
            uuid: String::new(),
            name: format!("GPU {index}"),
            memory_total_mib: None,
            memory_used_mib: None,
            utilization_percent: None,
        }
    }
}

/// Parses the output of `nvidia-smi` run with [`NVIDIA_SMI_ARGS`], one GPU a line, e.g.
/// `0, GPU-d397e325-8dda-2441-cc82-83fa0e941d11, NVIDIA H200, 143771 MiB, 0 MiB, 0 %`.
/// Values `nvidia-smi` cannot read (`[N/A]`, `[Not Supported]`) become `None`.
pub fn parse_nvidia_smi(out: &str) -> Result<Vec<GpuInfo>> {
    let mut gpus = Vec::new();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != 6 {
            return Err(RunnerError::GpuList(format!(
                "expected 6 comma-separated fields, got {} in `{line}`",
                fields.len()
            )));
        }
        let index = fields[0].parse::<u32>().map_err(|_| {
            RunnerError::GpuList(format!(
                "GPU index `{}` is not a number in `{line}`",
                fields[0]
            ))
        })?;
        gpus.push(GpuInfo {
            index,
            uuid: fields[1].to_string(),
            name: fields[2].to_string(),
            memory_total_mib: number_with_unit(fields[3], "MiB"),
            memory_used_mib: number_with_unit(fields[4], "MiB"),
            utilization_percent: number_with_unit(fields[5], "%")
                .and_then(|v| u32::try_from(v).ok()),
        });
    }
    let mut seen = BTreeSet::new();
    if let Some(dup) = gpus.iter().find(|g| !seen.insert(g.index)) {
        return Err(RunnerError::GpuList(format!(
            "GPU index {} is listed twice",
            dup.index
        )));
    }
    Ok(gpus)
}

fn number_with_unit(field: &str, unit: &str) -> Option<u64> {
    field
        .strip_suffix(unit)
        .unwrap_or(field)
        .trim()
        .parse()
        .ok()
}

/// Runs `program` (normally `nvidia-smi` from `PATH`); `None` when it is absent, fails or hangs.
fn query_nvidia_smi(program: &OsStr) -> Option<String> {
    let spawn = || {
        Command::new(program)
            .args(NVIDIA_SMI_ARGS)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
    };
    let mut spawned = spawn();
    // A program written just now can be briefly "busy" while a process forked elsewhere still holds its
    // write handle; that passes within milliseconds.
    for _ in 0..10 {
        match &spawned {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(20));
                spawned = spawn();
            }
            _ => break,
        }
    }
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!("no nvidia-smi on PATH: this runner has no GPUs");
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot run nvidia-smi: this runner has no GPUs");
            return None;
        }
    };
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let deadline = Instant::now() + NVIDIA_SMI_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                tracing::warn!("nvidia-smi did not answer in time: this runner has no GPUs");
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot wait for nvidia-smi: this runner has no GPUs");
                return None;
            }
        }
    };
    let out = reader.join().ok()?.ok()?;
    if !status.success() {
        tracing::warn!(%status, "nvidia-smi failed: this runner has no GPUs");
        return None;
    }
    Some(out)
}

#[derive(Debug)]
struct Pool {
    free: BTreeSet<u32>,
}

/// This machine's GPUs and which of them are free. Clones share the same pool.
#[derive(Debug, Clone)]
pub struct GpuInventory {
    gpus: Arc<Vec<GpuInfo>>,
    pool: Arc<Mutex<Pool>>,
}

impl GpuInventory {
    /// Builds the inventory from `source`; `Auto` runs `nvidia-smi` (blocking, at most a few seconds).
    pub fn from_source(source: &GpuSource) -> Self {
        match source {
            GpuSource::Count(n) => Self::with_count(*n),
            GpuSource::Auto => Self::detect(),
            GpuSource::Ids(ids) => {
                Self::from_gpus(ids.iter().copied().map(GpuInfo::numbered).collect())
            }
        }
    }

    /// Reads the GPUs from `nvidia-smi` on `PATH`; none when it is absent or unreadable.
    pub fn detect() -> Self {
        Self::detect_with("nvidia-smi")
    }

    /// Reads the GPUs from the `nvidia-smi` at `program`; none when it is absent or unreadable.
    pub fn detect_with(program: impl AsRef<OsStr>) -> Self {
        let gpus = match query_nvidia_smi(program.as_ref()).map(|out| parse_nvidia_smi(&out)) {
            Some(Ok(gpus)) => gpus,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "ignoring nvidia-smi output: this runner has no GPUs");
                Vec::new()
            }
            None => Vec::new(),
        };
        for g in &gpus {
            tracing::info!(index = g.index, uuid = %g.uuid, name = %g.name, "found GPU");
        }
        Self::from_gpus(gpus)
    }

    /// `n` GPUs with indices `0..n`.
    pub fn with_count(n: u32) -> Self {
        Self::from_gpus((0..n).map(GpuInfo::numbered).collect())
    }

    /// The given GPUs, all free.
    pub fn from_gpus(gpus: Vec<GpuInfo>) -> Self {
        let free = gpus.iter().map(|g| g.index).collect();
        Self {
            gpus: Arc::new(gpus),
            pool: Arc::new(Mutex::new(Pool { free })),
        }
    }

    /// Every GPU of this machine.
    pub fn gpus(&self) -> &[GpuInfo] {
        &self.gpus
    }

    /// How many GPUs this machine has.
    pub fn total(&self) -> u32 {
        u32::try_from(self.gpus.len()).unwrap_or(u32::MAX)
    }

    /// How many GPUs no session holds.
    pub fn free(&self) -> u32 {
        u32::try_from(self.lock().free.len()).unwrap_or(u32::MAX)
    }

    /// Takes `n` free GPUs (lowest indices first) until the returned lease drops.
    pub fn assign(&self, n: u32) -> Result<GpuLease> {
        let mut pool = self.lock();
        let free = u32::try_from(pool.free.len()).unwrap_or(u32::MAX);
        if n > free {
            return Err(RunnerError::NotEnoughGpus {
                asked: n,
                free,
                total: self.total(),
            });
        }
        let ids: Vec<u32> = pool.free.iter().copied().take(n as usize).collect();
        for id in &ids {
            pool.free.remove(id);
        }
        Ok(GpuLease {
            ids,
            pool: Arc::clone(&self.pool),
        })
    }

    /// Takes exactly the GPUs `ids` (those a runner that survived a restart still holds); ids this machine
    /// does not have or that are taken already are left out of the lease.
    pub fn take(&self, ids: &[u32]) -> GpuLease {
        let mut pool = self.lock();
        let ids: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| pool.free.remove(id))
            .collect();
        GpuLease {
            ids,
            pool: Arc::clone(&self.pool),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        // The pool is a plain set, consistent after any panic: recovering from poison is sound.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// GPUs held by one session; dropping the lease frees them.
#[derive(Debug)]
pub struct GpuLease {
    ids: Vec<u32>,
    pool: Arc<Mutex<Pool>>,
}

impl GpuLease {
    /// The device indices held, ascending.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The value of `CUDA_VISIBLE_DEVICES`: the indices comma-joined, empty for none.
    pub fn cuda_visible_devices(&self) -> String {
        self.ids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for GpuLease {
    fn drop(&mut self) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.free.extend(self.ids.iter().copied());
    }
}
