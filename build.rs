//! With the `emulation` feature, compiles the CUDA kernels of `kernels/` as C++ against the
//! emulation header, for running them on the CPU in tests.

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_EMULATION").is_none() {
        return;
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .file("kernels/emulation/emulation.cpp")
        .flag("-pthread")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true);
    if std::env::var_os("CARGO_FEATURE_TSAN").is_some() {
        build.flag("-fsanitize=thread").flag("-g").opt_level(1);
        println!("cargo:rustc-link-lib=dylib=tsan");
    }
    build.compile("hidden_align_emulation");
}
