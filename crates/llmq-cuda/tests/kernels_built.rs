//! The test command compiles every kernel. scripts/test.sh installs nvcc and sets
//! LLMQ_REQUIRE_KERNELS=1; a build that still has no kernels (the build script's "no nvcc" result
//! cached by an earlier build) fails here instead of letting every GPU test skip unnoticed.

#[test]
fn kernels_are_compiled_when_the_test_command_requires_them() {
    if std::env::var("LLMQ_REQUIRE_KERNELS").is_ok_and(|v| v == "1") {
        // (a value of this build, read at run time: the variable decides whether it must hold)
        let built = std::hint::black_box(llmq_cuda::KERNELS_BUILT);
        assert!(built, "LLMQ_REQUIRE_KERNELS=1 but llmq-cuda was built without CUDA kernels: the build script did not find nvcc (LLMQ_NVCC={:?})", std::env::var("LLMQ_NVCC").ok());
    } else {
        println!("SKIPPED: LLMQ_REQUIRE_KERNELS is not set (scripts/test.sh sets it after installing nvcc)");
    }
}
