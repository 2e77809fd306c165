//! Compiles the CUDA kernels in `kernels/` into one fatbin (sm_80, sm_89, sm_90a machine code and
//! compute_90 PTX) that `src/kernels.rs` embeds with `include_bytes!`.
//!
//! nvcc is looked for in `$LLMQ_NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`, the project's
//! `.cuda-toolchain/` (made by `scripts/install-nvcc.sh`) and the pip wheels of the running
//! `python3` (site-packages/nvidia/cu13/bin/nvcc). Without nvcc the crate builds CPU-only and
//! `CudaBackend::new` reports "built without CUDA kernels". With nvcc, a kernel that fails to
//! compile fails the build.
//!
//! The CUTLASS headers (pip wheel `nvidia-cutlass`, `cutlass_library/source/include`, installed
//! beside nvcc by `scripts/install-nvcc.sh`) are looked for beside nvcc and in `.cuda-toolchain/`;
//! with them the CUTLASS kernels of `kernels/sm90/` are built (`build_sm90`): their device code
//! as an sm_90a cubin that `src/sm90.rs` embeds, their host code (kernel parameters) as a static
//! library linked into the crate. Without the headers the crate builds without them; under
//! `LLMQ_REQUIRE_KERNELS=1` a missing nvcc or missing headers fail the build.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn is_exe(p: &Path) -> bool {
    p.is_file()
}

fn find_nvcc(manifest_dir: &Path) -> Option<PathBuf> {
    if let Ok(p) = env::var("LLMQ_NVCC") {
        let p = PathBuf::from(p);
        if is_exe(&p) {
            return Some(p);
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(h) = env::var(var) {
            let p = Path::new(&h).join("bin").join("nvcc");
            if is_exe(&p) {
                return Some(p);
            }
        }
    }
    if let Ok(path) = env::var("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if is_exe(&p) {
                return Some(p);
            }
        }
    }
    // <workspace>/.cuda-toolchain (scripts/install-nvcc.sh)
    for anc in manifest_dir.ancestors() {
        let p = anc.join(".cuda-toolchain/nvidia/cu13/bin/nvcc");
        if is_exe(&p) {
            return Some(p);
        }
    }
    // pip wheels of the python3 on PATH
    let out = Command::new("python3")
        .args(["-c", "import nvidia, os; print('\\n'.join(os.path.join(p, 'cu13', 'bin', 'nvcc') for p in nvidia.__path__))"])
        .output()
        .ok()?;
    if out.status.success() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let p = PathBuf::from(line.trim());
            if is_exe(&p) {
                return Some(p);
            }
        }
    }
    None
}

/// The CUTLASS include directory: in the toolchain that holds `nvcc` (<dest>/nvidia/cu13/bin/nvcc
/// beside <dest>/cutlass_library) or in the project's `.cuda-toolchain/`.
fn find_cutlass(nvcc: &Path, manifest_dir: &Path) -> Option<PathBuf> {
    let beside_nvcc = nvcc.ancestors().nth(4).map(Path::to_path_buf);
    let project = manifest_dir.ancestors().map(|a| a.join(".cuda-toolchain"));
    beside_nvcc.into_iter().chain(project).map(|d| d.join("cutlass_library/source/include")).find(|inc| inc.join("cutlass/cutlass.h").is_file())
}

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = manifest_dir.join("kernels");
    println!("cargo::rustc-check-cfg=cfg(llmq_has_kernels)");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(llmq_has_sm90)");
    for v in ["LLMQ_NVCC", "CUDA_HOME", "CUDA_PATH", "LLMQ_NVCC_VERBOSE", "LLMQ_NO_KERNELS", "LLMQ_REQUIRE_KERNELS"] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kdir)
        .expect("kernels/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    for e in std::fs::read_dir(&kdir).unwrap().flatten() {
        println!("cargo:rerun-if-changed={}", e.path().display());
    }

    if env::var("LLMQ_NO_KERNELS").is_ok() {
        println!("cargo:warning=llmq-cuda: LLMQ_NO_KERNELS set: building without CUDA kernels");
        return;
    }
    let require = env::var("LLMQ_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let Some(nvcc) = find_nvcc(&manifest_dir) else {
        if require {
            panic!("llmq-cuda: LLMQ_REQUIRE_KERNELS=1 but nvcc was not found ($LLMQ_NVCC, $CUDA_HOME/bin, PATH, .cuda-toolchain, pip wheels): run scripts/install-nvcc.sh");
        }
        println!(
            "cargo:warning=llmq-cuda: nvcc not found (CUDA_HOME, PATH, .cuda-toolchain, pip wheels): building without CUDA kernels; run scripts/install-nvcc.sh"
        );
        return;
    };

    // (checked before the long compile below)
    let cutlass = find_cutlass(&nvcc, &manifest_dir);
    if cutlass.is_none() && require {
        panic!(
            "llmq-cuda: LLMQ_REQUIRE_KERNELS=1 but the CUTLASS headers (cutlass_library/source/include/cutlass/cutlass.h) are neither beside {} nor in .cuda-toolchain/: run scripts/install-nvcc.sh",
            nvcc.display()
        );
    }

    // One translation unit that includes every kernel file, so that nvcc makes one fatbin.
    let mut all = String::from("// generated by build.rs\n");
    for s in &sources {
        all.push_str(&format!("#include \"{}\"\n", s.display()));
    }
    let all_cu = out_dir.join("llmq_all.cu");
    std::fs::write(&all_cu, all).unwrap();
    let fatbin = out_dir.join("llmq_kernels.fatbin");

    let mut cmd = Command::new(&nvcc);
    cmd.arg("-fatbin")
        .arg("-std=c++17")
        .arg("-O3")
        // No fast math, and no implicit mul+add contraction: elementwise results match the CPU
        // backend bit for bit where the arithmetic is the same; kernels that want FMAs use fmaf.
        .arg("-fmad=false")
        .arg("--threads=2")
        .arg("-lineinfo")
        .arg(format!("-I{}", kdir.display()))
        .args(["-gencode", "arch=compute_80,code=sm_80"])
        .args(["-gencode", "arch=compute_89,code=sm_89"])
        .args(["-gencode", "arch=compute_90a,code=sm_90a"])
        .args(["-gencode", "arch=compute_90,code=compute_90"]);
    if env::var("LLMQ_NVCC_VERBOSE").is_ok() {
        cmd.arg("--resource-usage");
    }
    cmd.arg("-o").arg(&fatbin).arg(&all_cu);
    let out = cmd.output().unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        panic!("nvcc failed ({}):\n{}\n{}", nvcc.display(), String::from_utf8_lossy(&out.stdout), stderr);
    }
    std::fs::write(out_dir.join("nvcc.log"), format!("{}\n{}", String::from_utf8_lossy(&out.stdout), stderr)).ok();
    for line in stderr.lines().filter(|l| l.contains("warning")) {
        println!("cargo:warning=nvcc: {line}");
    }
    println!("cargo:rustc-cfg=llmq_has_kernels");
    println!("cargo:rustc-env=LLMQ_NVCC_PATH={}", nvcc.display());

    match cutlass {
        Some(inc) => build_sm90(&nvcc, &inc, &kdir.join("sm90"), &out_dir),
        None => println!("cargo:warning=llmq-cuda: CUTLASS headers not found (run scripts/install-nvcc.sh): building without the sm90 CUTLASS kernels"),
    }
}

/// Runs nvcc, failing the build with its output when it fails.
fn run_nvcc(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running nvcc for {what}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        panic!("nvcc failed ({what}):\n{}\n{stderr}", String::from_utf8_lossy(&out.stdout));
    }
    for line in stderr.lines().filter(|l| l.contains("warning") || l.contains("C75")) {
        println!("cargo:warning=nvcc ({what}): {line}");
    }
}

/// The CUTLASS kernels of `kernels/sm90/`, sm_90a only (wgmma, TMA): `fp8_swiglu_gemm.cu` into
/// `llmq_sm90.cubin`, and `fp8_swiglu_host.cu` (CUTLASS's host code that fills the kernel
/// parameters; no device code) with `cudart_stubs.cpp` into the static library `llmq_sm90_host`.
/// The two compiles run side by side, one nvcc process each (measured on a 2-core machine: 25 s
/// and 3.2 GB for the kernel, 33 s and 1.3 GB for the host code).
fn build_sm90(nvcc: &Path, cutlass: &Path, dir: &Path, out_dir: &Path) {
    let common = |cmd: &mut Command| {
        cmd.args(["-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG", "-arch=sm_90a"])
            .arg(format!("-I{}", dir.display()))
            .arg(format!("-I{}", cutlass.display()));
    };
    let cubin = out_dir.join("llmq_sm90.cubin");
    let mut dev = Command::new(nvcc);
    common(&mut dev);
    // -fmad=false: the epilogue's SwiGLU arithmetic is swiglu.cu's (no mul+add contraction).
    dev.args(["-cubin", "-O3", "-fmad=false", "-lineinfo"]).arg("-o").arg(&cubin).arg(dir.join("fp8_swiglu_gemm.cu"));
    let lib = out_dir.join("libllmq_sm90_host.a");
    let mut host = Command::new(nvcc);
    common(&mut host);
    host.args(["-lib", "-O2", "-Xcompiler", "-fPIC"]).arg("-o").arg(&lib).arg(dir.join("fp8_swiglu_host.cu")).arg(dir.join("cudart_stubs.cpp"));
    std::thread::scope(|s| {
        s.spawn(move || run_nvcc(dev, "kernels/sm90 device code"));
        s.spawn(move || run_nvcc(host, "kernels/sm90 host code"));
    });
    println!("cargo:rustc-link-search=native={}", out_dir.display());
    println!("cargo:rustc-link-lib=static=llmq_sm90_host");
    println!("cargo:rustc-link-lib=dylib=stdc++");
    println!("cargo:rustc-cfg=llmq_has_sm90");
}
