//! `gpumem info`: the GPUs, the driver's free and used memory, and per-process use.

use crate::Failure;
use serde::Serialize;

#[derive(Serialize)]
struct Process {
    pid: u32,
    name: String,
    used_bytes: Option<u64>,
}

#[derive(Serialize)]
struct Gpu {
    index: usize,
    name: String,
    /// NVML's UUID (`GPU-...`), which matches `torch.cuda.get_device_properties(i).uuid`
    /// whatever the device order (NVML's index follows PCI order, CUDA's may not); None
    /// without NVML.
    uuid: Option<String>,
    total_bytes: u64,
    free_bytes: u64,
    used_bytes: u64,
    processes: Vec<Process>,
}

#[derive(Serialize)]
struct Info {
    source: &'static str,
    driver_version: Option<String>,
    gpus: Vec<Gpu>,
    note: &'static str,
}

const NOTE: &str = "nvidia-smi shows more per process than memory_reserved(): each process also holds its CUDA \
context (typically 300-600 MiB) and library workspaces (cuBLAS, cuDNN, NCCL), which no caching allocator manages \
and empty_cache() cannot free.";

fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "(not visible from here)".into())
}

fn from_nvml() -> Result<Info, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| e.to_string())?;
    let count = nvml.device_count().map_err(|e| e.to_string())?;
    let mut gpus = Vec::new();
    for i in 0..count {
        let d = nvml.device_by_index(i).map_err(|e| e.to_string())?;
        let m = d.memory_info().map_err(|e| e.to_string())?;
        let processes = d
            .running_compute_processes()
            .unwrap_or_default()
            .into_iter()
            .map(|p| Process {
                pid: p.pid,
                name: process_name(p.pid),
                used_bytes: match p.used_gpu_memory {
                    nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => Some(b),
                    nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => None,
                },
            })
            .collect();
        gpus.push(Gpu {
            index: i as usize,
            name: d.name().unwrap_or_else(|_| format!("GPU {i}")),
            uuid: d.uuid().ok(),
            total_bytes: m.total,
            free_bytes: m.free,
            used_bytes: m.used,
            processes,
        });
    }
    Ok(Info { source: "NVML", driver_version: nvml.sys_driver_version().ok(), gpus, note: NOTE })
}

fn from_cuda() -> Result<Info, String> {
    use gpumem::Device;
    let n = gpumem::device_count().map_err(|e| e.to_string())?;
    let mut gpus = Vec::new();
    for i in 0..n {
        let d = gpumem::CudaDevice::new(i).map_err(|e| e.to_string())?;
        let (free, total) = d.mem_get_info().map_err(|e| e.to_string())?;
        gpus.push(Gpu {
            index: i,
            name: d.name(),
            uuid: None,
            total_bytes: total,
            free_bytes: free,
            used_bytes: total - free,
            processes: Vec::new(),
        });
    }
    Ok(Info {
        source: "CUDA driver (NVML not found: no per-process figures)",
        driver_version: None,
        gpus,
        note: NOTE,
    })
}

fn mib(b: u64) -> String {
    format!("{} MiB", b >> 20)
}

pub(crate) fn run(json: bool) -> Result<(), Failure> {
    let info = match from_nvml() {
        Ok(i) => i,
        Err(nvml_err) => from_cuda().map_err(|cuda_err| {
            Failure::Work(format!(
                "no NVIDIA driver found: NVML ({nvml_err}) and the CUDA driver ({cuda_err}) are both unavailable, so there is no GPU to report; `gpumem replay` and `gpumem demo --device sim` work without one"
            ))
        })?,
    };
    if json {
        println!("{}", serde_json::to_string(&info).expect("info serializes"));
        return Ok(());
    }
    println!(
        "{} GPU(s), from {}{}",
        info.gpus.len(),
        info.source,
        info.driver_version.as_ref().map(|v| format!(", driver {v}")).unwrap_or_default()
    );
    for g in &info.gpus {
        println!(
            "GPU {}: {}{}: total {}, free {}, used {}",
            g.index,
            g.name,
            g.uuid.as_ref().map(|u| format!(" ({u})")).unwrap_or_default(),
            mib(g.total_bytes),
            mib(g.free_bytes),
            mib(g.used_bytes)
        );
        if g.processes.is_empty() {
            println!("  no compute processes");
        }
        for p in &g.processes {
            let used = p.used_bytes.map(mib).unwrap_or_else(|| "unknown".into());
            let me = if p.pid == std::process::id() { " (this process)" } else { "" };
            println!("  pid {:>8}  {:<24} {used}{me}", p.pid, p.name);
        }
    }
    println!("{}", info.note);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--json` carries each GPU's UUID (scripts/ddp_bench.py matches a rank's GPU by it), and
    /// null where only the CUDA driver answered.
    #[test]
    fn json_has_each_gpus_uuid() {
        let gpu = |uuid: Option<&str>| Gpu {
            index: 0,
            name: "GPU".into(),
            uuid: uuid.map(String::from),
            total_bytes: 1,
            free_bytes: 1,
            used_bytes: 0,
            processes: vec![Process { pid: 7, name: "python3".into(), used_bytes: Some(1 << 20) }],
        };
        let info = Info {
            source: "NVML",
            driver_version: None,
            gpus: vec![gpu(Some("GPU-0b1c")), gpu(None)],
            note: NOTE,
        };
        let v: serde_json::Value = serde_json::from_str(&serde_json::to_string(&info).unwrap()).unwrap();
        assert_eq!(v["gpus"][0]["uuid"], "GPU-0b1c");
        assert!(v["gpus"][1]["uuid"].is_null());
        assert_eq!(v["gpus"][0]["processes"][0]["pid"], 7);
        assert_eq!(v["gpus"][0]["processes"][0]["used_bytes"], 1 << 20);
    }
}
