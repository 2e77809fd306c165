//! NVML telemetry of the GPU a CUDA backend runs on (found by its PCI bus id).

use llmq_core::BackendOptions;
use llmq_cuda::telemetry::Telemetry;

#[test]
fn a_gpu_reports_its_clock_power_and_memory() {
    if let Err(why) = llmq_cuda::cuda_available() {
        return llmq_cuda::skip_gpu_test(&why);
    }
    let be = llmq_cuda::CudaBackend::new(0, &BackendOptions::default()).unwrap();
    let t = match Telemetry::open(be.pci_bus_id()) {
        Ok(t) => t,
        Err(why) => return llmq_cuda::skip_gpu_test(&why),
    };
    let s = t.sample();
    assert!(s["sm_clock_mhz"].as_u64().is_some_and(|c| c > 100), "{s}");
    assert!(s["power_w"].as_f64().is_some_and(|p| p > 1.0), "{s}");
    assert!(s["memory_used_bytes"].as_u64().is_some_and(|m| m > 0), "{s}");
}

#[test]
fn a_bus_id_that_no_gpu_has_is_a_reason_not_a_panic() {
    let e = Telemetry::open("FFFFFFFF:FF:FF.0").err().expect("no GPU sits at that bus id");
    assert!(e.contains("NVML"), "{e}");
}
