//! Compiles the C++ shim (src/throw.cpp): the one piece of the allocator's C interface that
//! Rust cannot write, since only C++ can throw the exception that PyTorch turns into a Python
//! error when an allocation fails.

fn main() {
    println!("cargo:rerun-if-changed=src/throw.cpp");
    cc::Build::new().cpp(true).file("src/throw.cpp").flag_if_supported("-std=c++17").compile("gpumem_throw");
}
