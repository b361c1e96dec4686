//! Blacktree: a synchronous, threaded build orchestrator. It consumes Docker build jobs
//! from RabbitMQ, runs each on a free gRPC build worker, and publishes the worker's
//! answer as the job's status. See ARCHITECTURE.md for the threads and channels.

pub mod agent;
pub mod amqp;
pub mod cli;
pub mod config;
pub mod grpc;
pub mod instance;
pub mod job;
pub mod labels;
pub mod lock;
pub mod log_sink;
pub mod metrics;
pub mod orchestrator;
pub mod pipeline;
pub mod plural;
pub mod proto;
pub mod web;
