//! Generates the protobuf messages and gRPC services of `proto/*.proto` into `OUT_DIR`,
//! in pure Rust (no `protoc` needed): `protobuf-codegen-pure` parses the files and writes
//! the messages, and `grpcio-compiler` writes the service stubs from the same descriptors.

use std::path::{Path, PathBuf};

const PROTOS: [&str; 2] = ["proto/job.proto", "proto/worker.proto"];

fn main() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    protobuf_codegen_pure::Codegen::new()
        .out_dir(&out_dir)
        .include("proto")
        .inputs(PROTOS)
        .run()
        .expect("generating protobuf messages from proto/*.proto");

    let inputs: Vec<&Path> = PROTOS.iter().map(Path::new).collect();
    let parsed = protobuf_codegen_pure::parse_and_typecheck(&[Path::new("proto")], &inputs)
        .expect("parsing proto/*.proto");
    for file in grpcio_compiler::codegen::gen(&parsed.file_descriptors, &parsed.relative_paths) {
        std::fs::write(out_dir.join(&file.name), file.content)
            .unwrap_or_else(|e| panic!("writing generated {}: {e}", file.name));
    }
}
