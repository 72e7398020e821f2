//! GPU discovery. NVML is loaded at run time (dlopen), so the binary builds and runs where no
//! NVIDIA library exists; there, and in tests, the inventory is virtual and labelled so.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum GpuSource {
    /// Read from the NVIDIA driver through NVML.
    Nvml,
    /// Declared in the pipeline file; no physical device behind it.
    Virtual,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GpuInfo {
    pub name: String,
    pub uuid: Option<String>,
    pub memory: u64,
    pub source: GpuSource,
    /// For a virtual device: a JSON file standing in for NVML's readings (tests, demos).
    pub telemetry: Option<std::path::PathBuf>,
}

/// One reading of one device.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSample {
    #[serde(rename = "utilization")]
    pub utilization_pct: u32,
    #[serde(default)]
    pub memory_used: u64,
    /// `(pid, bytes)` of the compute processes on the device.
    #[serde(default, deserialize_with = "processes")]
    pub processes: Vec<(u32, u64)>,
}

fn processes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(u32, u64)>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct P {
        pid: u32,
        #[serde(default)]
        used_memory: u64,
    }
    let list: Vec<P> = serde::Deserialize::deserialize(d)?;
    Ok(list.into_iter().map(|p| (p.pid, p.used_memory)).collect())
}

/// Reads devices once per sampling interval. `None` for a device means nothing is known
/// about it (a virtual device without telemetry, or a reading that failed).
pub trait GpuSampler: Send + Sync {
    fn sample(&self) -> Vec<Option<DeviceSample>>;
}

/// Samples the devices of `gpus`: through NVML for real ones, from telemetry files for
/// virtual ones.
pub struct Sampler {
    nvml: Option<nvml_wrapper::Nvml>,
    gpus: Vec<GpuInfo>,
}

impl Sampler {
    pub fn new(gpus: Vec<GpuInfo>) -> Sampler {
        let nvml = if gpus.iter().any(|g| g.source == GpuSource::Nvml) {
            nvml_wrapper::Nvml::init().inspect_err(|e| tracing::warn!("NVML failed to load for sampling: {e}")).ok()
        } else {
            None
        };
        Sampler { nvml, gpus }
    }
}

impl GpuSampler for Sampler {
    fn sample(&self) -> Vec<Option<DeviceSample>> {
        self.gpus
            .iter()
            .enumerate()
            .map(|(i, g)| match (g.source, &self.nvml, &g.telemetry) {
                (GpuSource::Nvml, Some(nvml), _) => nvml_sample(nvml, g, i as u32)
                    .inspect_err(|e| tracing::debug!(device = i, "NVML reading failed: {e}"))
                    .ok(),
                (GpuSource::Virtual, _, Some(path)) => {
                    read_telemetry(path).inspect_err(|e| tracing::debug!(device = i, "telemetry: {e}")).ok()
                }
                _ => None,
            })
            .collect()
    }
}

fn nvml_sample(
    nvml: &nvml_wrapper::Nvml,
    gpu: &GpuInfo,
    index: u32,
) -> Result<DeviceSample, nvml_wrapper::error::NvmlError> {
    // Look the device up by UUID: indices can change, UUIDs do not.
    let device = match &gpu.uuid {
        Some(uuid) => nvml.device_by_uuid(uuid.as_str())?,
        None => nvml.device_by_index(index)?,
    };
    let processes = device
        .running_compute_processes()?
        .into_iter()
        .map(|p| {
            let bytes = match p.used_gpu_memory {
                nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => b,
                nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => 0,
            };
            (p.pid, bytes)
        })
        .collect();
    Ok(DeviceSample {
        utilization_pct: device.utilization_rates()?.gpu,
        memory_used: device.memory_info()?.used,
        processes,
    })
}

/// Parses a telemetry file: `{"utilization": 0, "memory_used": 123, "processes": [{"pid": 1, "used_memory": 2}]}`.
pub fn read_telemetry(path: &std::path::Path) -> Result<DeviceSample, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_telemetry(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn parse_telemetry(text: &str) -> Result<DeviceSample, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

impl GpuInfo {
    /// The value for `CUDA_VISIBLE_DEVICES`: the UUID where known (stable even if the driver
    /// renumbers devices), else the position.
    pub fn cuda_id(&self, index: u32) -> String {
        self.uuid.clone().unwrap_or_else(|| index.to_string())
    }
}

/// The seam to the real GPUs.
pub trait GpuProbe {
    /// Devices present now; empty where there are none or no driver.
    fn discover(&self) -> Vec<GpuInfo>;
}

/// Discovers devices through NVML.
pub struct NvmlProbe;

impl GpuProbe for NvmlProbe {
    fn discover(&self) -> Vec<GpuInfo> {
        match nvml_devices() {
            Ok(devices) => devices,
            Err(e) => {
                tracing::info!("no NVIDIA GPUs found through NVML ({e}); `gpus: auto` gives an empty inventory");
                Vec::new()
            }
        }
    }
}

fn nvml_devices() -> Result<Vec<GpuInfo>, nvml_wrapper::error::NvmlError> {
    let nvml = nvml_wrapper::Nvml::init()?;
    let mut out = Vec::new();
    for i in 0..nvml.device_count()? {
        let device = nvml.device_by_index(i)?;
        out.push(GpuInfo {
            name: device.name()?,
            uuid: Some(device.uuid()?),
            memory: device.memory_info()?.total,
            source: GpuSource::Nvml,
            telemetry: None,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_parses_and_refuses_unknown_fields() {
        let s = parse_telemetry(r#"{"utilization": 0, "memory_used": 55834574848, "processes": [{"pid": 4242, "used_memory": 55834574848}]}"#).unwrap();
        assert_eq!(s, DeviceSample { utilization_pct: 0, memory_used: 52 << 30, processes: vec![(4242, 52 << 30)] });
        assert_eq!(parse_telemetry(r#"{"utilization": 97}"#).unwrap().processes, vec![]);
        assert!(parse_telemetry(r#"{"utilisation": 97}"#).unwrap_err().contains("unknown field"));
    }

    #[test]
    fn virtual_devices_without_telemetry_give_no_reading() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gpu0.json");
        std::fs::write(&file, r#"{"utilization": 12}"#).unwrap();
        let virt = |telemetry| GpuInfo {
            name: "v".into(),
            uuid: None,
            memory: 1 << 30,
            source: GpuSource::Virtual,
            telemetry,
        };
        let sampler = Sampler::new(vec![virt(None), virt(Some(file))]);
        let samples = sampler.sample();
        assert_eq!(samples[0], None);
        assert_eq!(samples[1].as_ref().unwrap().utilization_pct, 12);
    }
}
