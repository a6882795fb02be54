//! Compiles `proto/chatproto.proto` with protox (a pure-Rust parser), so no
//! system `protoc` is needed to build.

fn main() {
    // Read at run time, not with env!(): a build script compiled for one
    // checkout is reused by cargo for another sharing the target dir, and
    // must read that checkout's schema.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = std::path::Path::new(&manifest).join("../../proto");
    let file = root.join("chatproto.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&root]).expect("proto/chatproto.proto must compile");
    prost_build::Config::new()
        .compile_fds(fds)
        .expect("prost code generation");
}
