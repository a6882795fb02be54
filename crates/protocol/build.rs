//! Compiles `proto/chatproto.proto` with protox (a pure-Rust parser), so no
//! system `protoc` is needed to build, then generates the types (prost) and
//! their canonical JSON mapping (pbjson) from the same descriptors, so the
//! two encodings cannot drift apart.

use prost::Message;

fn main() {
    // Read at run time, not with env!(): a build script compiled for one
    // checkout is reused by cargo for another sharing the target dir, and
    // must read that checkout's schema.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = std::path::Path::new(&manifest).join("../../proto");
    let file = root.join("chatproto.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&root]).expect("proto/chatproto.proto must compile");
    let descriptors = fds.encode_to_vec();
    prost_build::Config::new()
        .compile_fds(fds)
        .expect("prost code generation");
    // The serde impls go beside the prost types (`chatproto.serde.rs`);
    // field names are lowerCamelCase on output and accepted in either
    // spelling on input, enums are written by name and read by name or
    // number, as the protobuf JSON mapping says. Unknown fields are refused.
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)
        .expect("descriptor set from protox")
        .build(&[".chatproto"])
        .expect("pbjson code generation");
}
