//! Generated from `proto/job.proto`; see `build.rs`.
include!(concat!(env!("OUT_DIR"), "/job.rs"));
