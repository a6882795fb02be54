//! Compiles `proto/chatproto.proto` with protox (a pure-Rust parser), so no
//! system `protoc` is needed to build.

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let file = root.join("chatproto.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&root]).expect("proto/chatproto.proto must compile");
    prost_build::Config::new()
        .compile_fds(fds)
        .expect("prost code generation");
}
