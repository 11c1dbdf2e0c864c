//! The GPU inventory: reading `nvidia-smi`, handing out and taking back devices.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use nsml_runner::gpu::{GpuInventory, GpuSource, NVIDIA_SMI_ARGS, parse_nvidia_smi};

/// Read off an NVIDIA H200 machine (docs: reference/gpu-machine.md).
const H200: &str =
    "0, GPU-d397e325-8dda-2441-cc82-83fa0e941d11, NVIDIA H200, 143771 MiB, 0 MiB, 0 %\n";

#[test]
fn parses_the_h200_fixture() {
    let gpus = parse_nvidia_smi(H200).unwrap();
    assert_eq!(gpus.len(), 1);
    let g = &gpus[0];
    assert_eq!(g.index, 0);
    assert_eq!(g.uuid, "GPU-d397e325-8dda-2441-cc82-83fa0e941d11");
    assert_eq!(g.name, "NVIDIA H200");
    assert_eq!(g.memory_total_mib, Some(143_771));
    assert_eq!(g.memory_used_mib, Some(0));
    assert_eq!(g.utilization_percent, Some(0));
}

#[test]
fn parses_several_gpus_and_unreadable_values() {
    let out = "0, GPU-a, NVIDIA A100-SXM4-80GB, 81920 MiB, 1024 MiB, 37 %\n\
               1, GPU-b, NVIDIA A100-SXM4-80GB, 81920 MiB, [N/A], [Not Supported]\n\n";
    let gpus = parse_nvidia_smi(out).unwrap();
    assert_eq!(gpus.iter().map(|g| g.index).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(gpus[0].utilization_percent, Some(37));
    assert_eq!(gpus[1].memory_used_mib, None);
    assert_eq!(gpus[1].utilization_percent, None);
    assert!(parse_nvidia_smi("").unwrap().is_empty());
}

#[test]
fn refuses_output_it_does_not_understand() {
    // The header line of `--format=csv` (without `noheader`) is not a GPU.
    let with_header =
        "index, uuid, name, memory.total [MiB], memory.used [MiB], utilization.gpu [%]\n";
    assert!(parse_nvidia_smi(with_header).is_err());
    assert!(parse_nvidia_smi("0, GPU-a, only three\n").is_err());
    assert!(
        parse_nvidia_smi(&format!("{H200}{H200}")).is_err(),
        "duplicate index"
    );
}

#[test]
fn inventory_from_the_fixture_has_its_gpus() {
    let inv = GpuInventory::from_gpus(parse_nvidia_smi(H200).unwrap());
    assert_eq!((inv.total(), inv.free()), (1, 1));
    let lease = inv.assign(1).unwrap();
    assert_eq!(lease.cuda_visible_devices(), "0");
    assert_eq!(inv.free(), 0);
}

#[test]
fn assigns_free_gpus_and_takes_them_back_on_drop() {
    let inv = GpuInventory::with_count(4);
    let a = inv.assign(2).unwrap();
    assert_eq!(a.ids(), [0, 1]);
    let b = inv.assign(1).unwrap();
    assert_eq!(b.ids(), [2]);
    assert_eq!(inv.free(), 1);

    let err = inv.assign(2).unwrap_err().to_string();
    assert_eq!(err, "not enough free GPUs: asked 2, free 1 of 4");

    drop(a);
    assert_eq!(inv.free(), 3);
    let c = inv.assign(3).unwrap();
    assert_eq!(c.ids(), [0, 1, 3]);
    assert_eq!(c.cuda_visible_devices(), "0,1,3");

    let none = inv.assign(0).unwrap();
    assert!(none.ids().is_empty());
    assert_eq!(none.cuda_visible_devices(), "");
    drop((b, c, none));
    assert_eq!(inv.free(), 4);
}

#[test]
fn clones_share_one_pool() {
    let inv = GpuInventory::with_count(1);
    let other = inv.clone();
    let _held = inv.assign(1).unwrap();
    assert_eq!(
        other.assign(1).unwrap_err().to_string(),
        "not enough free GPUs: asked 1, free 0 of 1"
    );
}

#[test]
fn a_machine_without_gpus_has_none() {
    let inv = GpuInventory::with_count(0);
    assert_eq!(
        inv.assign(1).unwrap_err().to_string(),
        "not enough free GPUs: asked 1, free 0 of 0"
    );
    assert!(inv.assign(0).is_ok());
}

/// Writes an executable stand-in for `nvidia-smi` that prints `out` when called with the runner's query.
fn fake_nvidia_smi(dir: &std::path::Path, out: &str, status: i32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("nvidia-smi");
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = \"{}\" ] && [ \"$2\" = \"{}\" ] || exit 9\nprintf '%s' '{out}'\nexit {status}\n",
        NVIDIA_SMI_ARGS[0], NVIDIA_SMI_ARGS[1]
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn detects_gpus_through_nvidia_smi() {
    let dir = tempfile::tempdir().unwrap();
    let inv = GpuInventory::detect_with(fake_nvidia_smi(dir.path(), H200, 0));
    assert_eq!(inv.total(), 1);
    assert_eq!(inv.gpus()[0].name, "NVIDIA H200");
}

#[test]
fn a_missing_or_failing_nvidia_smi_means_no_gpus() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        GpuInventory::detect_with(dir.path().join("absent")).total(),
        0
    );
    let failing = fake_nvidia_smi(dir.path(), H200, 6);
    assert_eq!(GpuInventory::detect_with(failing).total(), 0);
    let garbage = fake_nvidia_smi(dir.path(), "No devices were found", 0);
    assert_eq!(GpuInventory::detect_with(garbage).total(), 0);
    assert_eq!(GpuInventory::from_source(&GpuSource::Count(3)).total(), 3);
}

#[test]
fn a_slurm_job_holds_the_gpus_slurm_allocated() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let ids = |source: GpuSource| match source {
        GpuSource::Ids(ids) => ids,
        other => panic!("expected GPU ids, got {other:?}"),
    };
    assert_eq!(
        ids(GpuSource::from_slurm_job(env(&[("SLURM_JOB_GPUS", "0,1")])).unwrap()),
        vec![0, 1]
    );
    // Slurm's own variable wins over what the environment says CUDA sees.
    assert_eq!(
        ids(GpuSource::from_slurm_job(env(&[
            ("SLURM_JOB_GPUS", "1"),
            ("CUDA_VISIBLE_DEVICES", "0")
        ]))
        .unwrap()),
        vec![1]
    );
    assert!(ids(GpuSource::from_slurm_job(env(&[])).unwrap()).is_empty());
    let bad = GpuSource::from_slurm_job(env(&[("SLURM_JOB_GPUS", "gpu0")])).unwrap_err();
    assert!(bad.to_string().contains("`gpu0`"), "{bad}");
    let inventory = GpuInventory::from_source(&GpuSource::Ids(vec![1, 3]));
    let lease = inventory.assign(2).unwrap();
    assert_eq!(lease.ids(), &[1, 3]);
}
