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
        });
    }
    Ok(out)
}
