//! Options of a GPU backend that choose kernels or matmul algorithms, and with them the last bits
//! of the results. They belong to the validated run configuration (printed, written to the JSON
//! log, compared on resume); the CPU backend has no choices and ignores them.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Which attention kernels run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionKernels {
    /// The tensor-core kernels of the device's family where they apply (bf16, Hd 64 or 128):
    /// wgmma / warp-specialised on compute capability 9.0, mma.sync elsewhere; the simple ones
    /// otherwise.
    #[default]
    Auto,
    /// The mma.sync kernels on any device with compute capability 8.0 or later (on 9.0: the
    /// cross-check of the Hopper kernels).
    Mma,
    /// Always the simple reference kernels (slow; any dtype, Hd <= 256).
    Simple,
}

impl AttentionKernels {
    pub fn parse(s: &str) -> Result<AttentionKernels> {
        match s {
            "auto" => Ok(AttentionKernels::Auto),
            "mma" => Ok(AttentionKernels::Mma),
            "simple" => Ok(AttentionKernels::Simple),
            _ => Err(Error::Config(format!("--attention: expected auto, mma or simple, got {s:?}"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            AttentionKernels::Auto => "auto",
            AttentionKernels::Mma => "mma",
            AttentionKernels::Simple => "simple",
        }
    }
}

/// `matmul_tuning` values that are not file paths.
pub const TUNING_EMBEDDED: &str = "embedded";
pub const TUNING_OFF: &str = "off";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendOptions {
    pub attention: AttentionKernels,
    /// SM-count target of the matmuls on the side stream (weight gradients beside the
    /// input-gradient chain): None = 3/4 of the device's SMs, 0 = no target.
    pub side_sms: Option<u32>,
    /// Side-stream matmuls run the algorithm the heuristic chooses for their SM target (on
    /// either stream, so moving them changes no bits); false: the one chosen without a target.
    pub side_algo: bool,
    /// Which cuBLASLt algorithm each matmul shape runs: "embedded" (the measured table built into
    /// the binary), "off" (the heuristic's first answer) or a table file whose entries override
    /// the embedded ones.
    pub matmul_tuning: String,
    /// Making a table: time every candidate algorithm of each shape the table does not list at
    /// its first call and append the choices to this file. The choices, and so the results,
    /// depend on the timings.
    pub matmul_autotune: Option<String>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions { attention: AttentionKernels::Auto, side_sms: None, side_algo: true, matmul_tuning: TUNING_EMBEDDED.into(), matmul_autotune: None }
    }
}

impl BackendOptions {
    /// Checks what can be checked without a device: the tuning file is readable, paths are not
    /// empty. (The SM target is checked against the device by the backend.)
    pub fn validate(&self) -> Result<()> {
        match self.matmul_tuning.as_str() {
            "" => return Err(Error::Config("--matmul-tuning: expected embedded, off or a file, got an empty string".into())),
            TUNING_EMBEDDED | TUNING_OFF => {}
            path => {
                std::fs::metadata(path).map_err(|e| Error::Config(format!("--matmul-tuning {path}: {e}")))?;
            }
        }
        if self.matmul_autotune.as_deref() == Some("") {
            return Err(Error::Config("--matmul-autotune: expected a file to write, got an empty string".into()));
        }
        Ok(())
    }

    /// One line for the resolved configuration, e.g.
    /// "attention auto | side-stream SMs 3/4 | side algorithms for the target | matmul tuning embedded".
    pub fn describe(&self) -> String {
        let sms = match self.side_sms {
            None => "3/4".to_string(),
            Some(0) => "all".to_string(),
            Some(n) => n.to_string(),
        };
        let algo = if self.side_algo { "for the target" } else { "without a target" };
        let mut s = format!("attention {} | side-stream SMs {sms} | side algorithms {algo} | matmul tuning {}", self.attention.name(), self.matmul_tuning);
        if let Some(out) = &self.matmul_autotune {
            s += &format!(" | autotune -> {out}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_missing_fields_take_defaults() {
        let d = BackendOptions::default();
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(serde_json::from_value::<BackendOptions>(v).unwrap(), d);
        // a configuration written before a field existed reads as today's default for it
        let o: BackendOptions = serde_json::from_str(r#"{"attention":"mma"}"#).unwrap();
        assert_eq!(o, BackendOptions { attention: AttentionKernels::Mma, ..d.clone() });
        assert!(serde_json::from_str::<BackendOptions>(r#"{"attention":"flash"}"#).is_err());
        assert!(serde_json::from_str::<BackendOptions>(r#"{"side_sm":3}"#).is_err(), "unknown fields are refused");
        assert_eq!(d.describe(), "attention auto | side-stream SMs 3/4 | side algorithms for the target | matmul tuning embedded");
    }

    #[test]
    fn validation_names_the_option_and_value() {
        assert!(BackendOptions::default().validate().is_ok());
        assert!(BackendOptions { matmul_tuning: TUNING_OFF.into(), ..Default::default() }.validate().is_ok());
        let e = BackendOptions { matmul_tuning: "/nonexistent/tune.txt".into(), ..Default::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("--matmul-tuning") && e.contains("/nonexistent/tune.txt"), "{e}");
        let e = BackendOptions { matmul_tuning: String::new(), ..Default::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("--matmul-tuning"), "{e}");
        let e = BackendOptions { matmul_autotune: Some(String::new()), ..Default::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("--matmul-autotune"), "{e}");
        let e = AttentionKernels::parse("v3").unwrap_err().to_string();
        assert!(e.contains("--attention") && e.contains("\"v3\""), "{e}");
        for k in [AttentionKernels::Auto, AttentionKernels::Mma, AttentionKernels::Simple] {
            assert_eq!(AttentionKernels::parse(k.name()).unwrap(), k);
        }
    }
}
