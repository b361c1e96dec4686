//! Generated from `proto/worker.proto`; see `build.rs`.
include!(concat!(env!("OUT_DIR"), "/worker_grpc.rs"));
