//! Generates the protobuf messages and gRPC services of `proto/*.proto` into `OUT_DIR`
//! without `protoc`: `protobuf-parse` 3 parses the files in pure Rust, its descriptor set
//! is re-read as protobuf 2 descriptors, and `protobuf-codegen` 2 (messages) and
//! `grpcio-compiler` (services) generate from them. `proto.rs` in `OUT_DIR` declares the
//! generated files as modules by path, so their inner attributes are allowed; their
//! warnings are silenced there (generated code is not ours to tidy).

use std::fmt::Write as _;
use std::path::PathBuf;

use protobuf3::Message as _;

const PROTOS: [&str; 2] = ["job.proto", "worker.proto"];

fn main() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=proto");

    let inputs: Vec<PathBuf> = PROTOS
        .iter()
        .map(|p| PathBuf::from("proto").join(p))
        .collect();
    let set = protobuf_parse::Parser::new()
        .pure()
        .include("proto")
        .inputs(&inputs)
        .file_descriptor_set()
        .expect("parsing proto/*.proto");
    let bytes = set.write_to_bytes().expect("serialising the descriptors");
    let set: protobuf::descriptor::FileDescriptorSet =
        protobuf::Message::parse_from_bytes(&bytes).expect("reading the descriptors as protobuf 2");
    let files: Vec<String> = PROTOS.iter().map(|p| p.to_string()).collect();

    let customize = protobuf_codegen::Customize::default();
    let mut generated = protobuf_codegen::gen(set.get_file(), &files, &customize);
    generated.extend(grpcio_compiler::codegen::gen(set.get_file(), &files));

    let mut modules = String::new();
    for file in generated {
        let path = out_dir.join(&file.name);
        std::fs::write(&path, file.content)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        let module = file.name.trim_end_matches(".rs");
        writeln!(
            modules,
            "#[allow(warnings, clippy::all)]\n#[path = {:?}]\npub mod {module};",
            path.display().to_string()
        )
        .expect("writing to a String");
    }
    std::fs::write(out_dir.join("proto.rs"), modules).expect("writing proto.rs");
}
