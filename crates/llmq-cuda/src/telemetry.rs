//! GPU telemetry through NVML: SM clock, power, temperature, utilisation and memory in use,
//! sampled once per step into the JSON log and onto the step line. NVML is loaded at run time;
//! where it is missing (no driver, the CPU backend) there is simply no telemetry.

use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::Nvml;

pub struct Telemetry {
    nvml: Nvml,
    /// PCI bus id of the GPU (the CUDA backend's, so that CUDA_VISIBLE_DEVICES cannot mix them up).
    bus_id: String,
}

impl Telemetry {
    /// NVML for the GPU at `bus_id`, or the reason there is none.
    pub fn open(bus_id: &str) -> Result<Telemetry, String> {
        let nvml = Nvml::init().map_err(|e| format!("NVML unavailable ({e})"))?;
        nvml.device_by_pci_bus_id(bus_id).map_err(|e| format!("NVML has no GPU at {bus_id} ({e})"))?;
        Ok(Telemetry { nvml, bus_id: bus_id.to_string() })
    }

    /// One sample; a reading the GPU does not offer is left out.
    pub fn sample(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        let Ok(d) = self.nvml.device_by_pci_bus_id(self.bus_id.as_str()) else { return m.into() };
        if let Ok(c) = d.clock_info(Clock::SM) {
            m.insert("sm_clock_mhz".into(), c.into());
        }
        if let Ok(p) = d.power_usage() {
            m.insert("power_w".into(), (p as f64 / 1000.0).into());
        }
        if let Ok(t) = d.temperature(TemperatureSensor::Gpu) {
            m.insert("temperature_c".into(), t.into());
        }
        if let Ok(u) = d.utilization_rates() {
            m.insert("utilization_pct".into(), u.gpu.into());
        }
        if let Ok(mem) = d.memory_info() {
            m.insert("memory_used_bytes".into(), mem.used.into());
        }
        m.into()
    }
}

/// " | 1980 MHz 612 W 61°C" for the step line, from a sample (the parts it has).
pub fn step_text(sample: &serde_json::Value) -> String {
    let mut parts = vec![];
    if let Some(c) = sample.get("sm_clock_mhz").and_then(|v| v.as_u64()) {
        parts.push(format!("{c} MHz"));
    }
    if let Some(p) = sample.get("power_w").and_then(|v| v.as_f64()) {
        parts.push(format!("{p:.0} W"));
    }
    if let Some(t) = sample.get("temperature_c").and_then(|v| v.as_u64()) {
        parts.push(format!("{t}°C"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" | {}", parts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_step_line_shows_what_a_sample_has() {
        let s = serde_json::json!({"sm_clock_mhz": 1980, "power_w": 611.6, "temperature_c": 61, "utilization_pct": 100});
        assert_eq!(step_text(&s), " | 1980 MHz 612 W 61°C");
        assert_eq!(step_text(&serde_json::json!({"power_w": 80.2})), " | 80 W");
        assert_eq!(step_text(&serde_json::json!({})), "");
    }
}
