//! Backend selection: a GPU when one is usable, otherwise the CPU reference backend.

use llmq_core::cpu::CpuBackend;
use llmq_core::{Backend, BackendOptions, Error, Result};

/// What we know about the GPU in use.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    /// Datasheet peaks (fp8, bf16) in FLOP/s for SOL%, when the GPU is known.
    pub peaks: Option<(f64, f64)>,
    /// PCI bus id, for telemetry.
    pub pci_bus_id: Option<String>,
}

/// Dense tensor-core peaks by GPU name (datasheet, no sparsity).
fn peaks_for(name: &str) -> Option<(f64, f64)> {
    let n = name.to_ascii_uppercase();
    if n.contains("H100") || n.contains("H200") || n.contains("H800") {
        Some((1978.9e12, 989.4e12))
    } else if n.contains("4090") {
        Some((660.6e12, 165.2e12))
    } else if n.contains("A100") {
        Some((312e12, 312e12))
    } else {
        None
    }
}

/// The backend for `--device`; a GPU backend makes the kernel and algorithm choices of `opts`.
pub fn select(device: &str, opts: &BackendOptions) -> Result<(Box<dyn Backend>, Option<GpuInfo>)> {
    select_with(device, 0, opts, |_| Ok(())).map(|(be, info, ())| (be, info))
}

/// Where `--device` runs: "cpu" or "cuda" (auto resolved: a GPU when one is usable, with a line
/// saying why not otherwise).
pub fn resolve(device: &str) -> Result<&'static str> {
    match device {
        "cpu" => Ok("cpu"),
        "cuda" | "gpu" | "auto" => match llmq_cuda::cuda_available() {
            Ok(()) => Ok("cuda"),
            Err(reason) if device == "auto" => {
                println!("no usable GPU ({reason}); running on the CPU backend");
                Ok("cpu")
            }
            Err(reason) => Err(Error::Backend(format!("--device {device}: {reason}"))),
        },
        other => Err(Error::Config(format!("--device: expected auto, cpu or cuda, got {other:?}"))),
    }
}

/// The backend on GPU `ordinal` (a data-parallel rank's), calling `with` on the CUDA backend (or
/// `None` on the CPU) before it is boxed: what needs the concrete backend (an NCCL communicator) is made there.
pub fn select_with<T>(device: &str, ordinal: usize, opts: &BackendOptions, with: impl FnOnce(Option<&llmq_cuda::CudaBackend>) -> Result<T>) -> Result<(Box<dyn Backend>, Option<GpuInfo>, T)> {
    match device {
        "cpu" => Ok((Box::new(CpuBackend::new()), None, with(None)?)),
        "cuda" | "gpu" | "auto" => match llmq_cuda::cuda_available() {
            Ok(()) => {
                let be = llmq_cuda::CudaBackend::new(ordinal, opts)?;
                let info = GpuInfo { peaks: peaks_for(be.device_name()), pci_bus_id: Some(be.pci_bus_id().to_string()) };
                let t = with(Some(&be))?;
                Ok((Box::new(be), Some(info), t))
            }
            Err(reason) if device == "auto" => {
                println!("no usable GPU ({reason}); running on the CPU backend");
                Ok((Box::new(CpuBackend::new()), None, with(None)?))
            }
            Err(reason) => Err(Error::Backend(format!("--device {device}: {reason}"))),
        },
        other => Err(Error::Config(format!(
            "--device: expected auto, cpu or cuda, got {other:?}"
        ))),
    }
}
