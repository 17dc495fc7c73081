//! With the `emulation` feature, compiles the CUDA kernels of `kernels/` as C++ against the
//! emulation header, for running them on the CPU in tests: the launcher once, and the kernels
//! once per block slot (`HA_EMU_SLOTS` in `kernels/emulation/cuda_emulation.hpp`), each copy
//! in its own namespace so that blocks on different slots have their own shared memory.

const SLOTS: usize = 4;

fn emulation_build(tsan: bool) -> cc::Build {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .flag("-pthread")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true);
    if tsan {
        // GCC warns that ThreadSanitizer does not model std::atomic_thread_fence; the kernels'
        // cross-block ordering also goes through acq_rel atomics, which it does model.
        build.flag("-fsanitize=thread").flag("-g").opt_level(1);
        build.flag_if_supported("-Wno-tsan");
    }
    build
}

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_EMULATION").is_none() {
        return;
    }
    let tsan = std::env::var_os("CARGO_FEATURE_TSAN").is_some();
    // The launcher first: static libraries are searched in order, and it references the slots.
    emulation_build(tsan)
        .file("kernels/emulation/emulation.cpp")
        .compile("hidden_align_emulation");
    for slot in 0..SLOTS {
        emulation_build(tsan)
            .file("kernels/emulation/kernels_slot.cpp")
            .define("HA_EMU_SLOT", slot.to_string().as_str())
            .compile(&format!("hidden_align_emulation_slot{slot}"));
    }
    if tsan {
        println!("cargo:rustc-link-lib=dylib=tsan");
    }
}
