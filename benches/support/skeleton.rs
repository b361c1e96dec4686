//! DESIGN.md's threads doing nothing but the hand-offs: what those threads cost by
//! themselves, between the one-thread floor loop ([`super::raw`]) and the orchestrator.
//!
//! A consumer thread decodes each delivery and sends it on a bounded `jobs` channel;
//! each of its dispatch threads takes a job, takes a free-worker hint, makes a
//! blocking `RunJob` (grpcio's own blocking call, completed on its completion-queue
//! thread), gives the hint back and sends the status to a publisher thread, which
//! publishes it with a confirm on a connection of its own and, per confirm, sends the
//! confirmed deliveries back to the consumer, which acks each run of them with one
//! `multiple` ack. No registry, ledger, metrics, log lines or cancel tokens: everything
//! the orchestrator does beyond this is its own work.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;

use amiquip::{ConfirmSmoother, Connection, ConsumerMessage, ConsumerOptions, Delivery, Publish};
use blacktree::amqp::AmqpUrl;
use blacktree::proto::job::JobRequest;
use blacktree::proto::job_grpc::JobServiceClient;
use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};

use super::raw::{fill, status_message, status_rate, Run, AMIQUIP_IO};
use super::{
    own_threads, serve_noop_workers, threads_cpu_seconds, tids_named, CpuMeter, NoopWorker,
    ThreadUse, NOOP_THREADS,
};
use crate::common::{Mq, Names};

/// The name prefix of the skeleton's threads (its gRPC client's too).
const SKELETON: &str = "skel-";

/// A job on its way from the consumer to a dispatch thread.
struct Job {
    tag: u64,
    job_id: String,
}

/// DESIGN.md's threads with nothing else, running.
pub struct Skeleton {
    /// The consumer thread; returns what all the threads used.
    consumer: JoinHandle<BTreeMap<String, ThreadUse>>,
    dispatchers: Vec<JoinHandle<()>>,
    publisher: JoinHandle<()>,
}

impl Skeleton {
    /// Starts the threads on the broker at `url`, on the queues of `names`, with one
    /// free-worker hint for each of the no-op workers on `ports`, and `window` dispatch
    /// threads and deliveries prefetched; they end once `jobs` jobs are acked.
    pub fn start(url: &str, names: &Names, ports: &[u16], window: u16, jobs: usize) -> Skeleton {
        let io_before = tids_named(AMIQUIP_IO);
        let url = AmqpUrl::parse(url).unwrap();
        let consuming = url.connect().unwrap();
        let publishing = url.connect().unwrap();
        let io: Vec<u32> = tids_named(AMIQUIP_IO)
            .into_iter()
            .filter(|tid| !io_before.contains(tid))
            .collect();
        assert_eq!(io.len(), 2, "one I/O thread for each of its connections");

        let env = Arc::new(
            grpcio::EnvBuilder::new()
                .cq_count(1)
                .name_prefix(format!("{SKELETON}grpc"))
                .build(),
        );
        let clients: Arc<Vec<_>> = Arc::new(
            ports
                .iter()
                .map(|&port| super::worker_client(&env, port))
                .collect(),
        );
        let (job_sender, job_receiver) = bounded::<Job>(usize::from(window));
        let (hint_sender, hint_receiver) = bounded::<usize>(ports.len());
        for worker in 0..ports.len() {
            hint_sender.send(worker).unwrap();
        }
        let (status_sender, status_receiver) = unbounded::<(u64, String)>();
        let (confirmed_sender, confirmed_receiver) = unbounded::<Vec<u64>>();
        let dispatchers = (0..window)
            .map(|i| {
                let (jobs, clients) = (job_receiver.clone(), clients.clone());
                let (hints, free) = (hint_receiver.clone(), hint_sender.clone());
                let statuses = status_sender.clone();
                std::thread::Builder::new()
                    .name(format!("{SKELETON}dispatch-{i}"))
                    .spawn(move || dispatch(jobs, hints, free, &clients, statuses))
                    .unwrap()
            })
            .collect();
        let exchange = names.exchange.clone();
        let publisher = std::thread::Builder::new()
            .name(format!("{SKELETON}publisher"))
            .spawn(move || publish(publishing, &exchange, status_receiver, confirmed_sender))
            .unwrap();
        let queue = names.execute.clone();
        let consumer = std::thread::Builder::new()
            .name(format!("{SKELETON}consumer"))
            .spawn(move || {
                let mut connection = consuming;
                consume(
                    &mut connection,
                    &queue,
                    window,
                    jobs,
                    &job_sender,
                    confirmed_receiver,
                );
                // Read while every thread of it is alive: they end once `job_sender` is
                // dropped.
                let threads: Vec<u32> = io.into_iter().chain(tids_named(SKELETON)).collect();
                let used = own_threads(&threads);
                let _ = connection.close();
                used
            })
            .unwrap();
        Skeleton {
            consumer,
            dispatchers,
            publisher,
        }
    }

    /// Waits for the threads to end; returns what they used, by kind of thread.
    pub fn finish(self) -> BTreeMap<String, ThreadUse> {
        let used = self.consumer.join().unwrap();
        for dispatcher in self.dispatchers {
            dispatcher.join().unwrap();
        }
        self.publisher.join().unwrap();
        used
    }
}

/// The throughput of DESIGN.md's threads alone, draining `jobs` jobs from the queues of
/// `mq` to `workers` no-op workers of one slot each, with as many dispatch threads and
/// deliveries prefetched; `measured` as in [`super::raw::raw_loop`]. Its own CPU and
/// sleeps are those of its threads (consumer, dispatch, publisher, gRPC client and the
/// two connections' amiquip I/O threads).
pub fn skeleton(
    url: &str,
    mq: &Mq,
    jobs: usize,
    workers: usize,
    measured: &[(&'static str, u32)],
) -> Run {
    let window = u16::try_from(workers).expect("at most 65535 workers");
    let (_workers, ports) = serve_noop_workers(NoopWorker::default(), workers, 1);
    fill(mq, jobs, "skel");
    let pids: Vec<u32> = measured.iter().map(|(_, pid)| *pid).collect();
    let meter = CpuMeter::start(&pids);
    let noop_before = threads_cpu_seconds(NOOP_THREADS);
    let skeleton = Skeleton::start(url, &mq.names, &ports, window, jobs);
    let rate = status_rate(mq, jobs);
    let threads = skeleton.finish();
    let (cpu, _) = meter.read();
    let names = measured.iter().map(|(name, _)| *name);
    let mut cpu: Vec<(&'static str, f64)> = names.zip(cpu).collect();
    cpu.push(("skeleton", ThreadUse::total(&threads).cpu));
    cpu.push((
        "noop_workers",
        threads_cpu_seconds(NOOP_THREADS) - noop_before,
    ));
    Run { rate, cpu, threads }
}

/// A dispatch thread: a job, a free worker, a blocking `RunJob`, the worker freed, the
/// status to the publisher.
fn dispatch(
    jobs: Receiver<Job>,
    hints: Receiver<usize>,
    free: Sender<usize>,
    clients: &[JobServiceClient],
    statuses: Sender<(u64, String)>,
) {
    for job in jobs {
        let worker = hints.recv().unwrap();
        let request = JobRequest {
            jobId: job.job_id,
            ..JobRequest::default()
        };
        let answer = clients[worker].run_job(&request).expect("an answer");
        free.send(worker).unwrap();
        statuses.send((job.tag, answer.jobId)).unwrap();
    }
}

/// The consumer thread: deliveries to `jobs` until `count` are acked; acks each run of
/// confirmed deliveries, oldest first, with one `multiple` ack.
fn consume(
    connection: &mut Connection,
    queue: &str,
    window: u16,
    count: usize,
    jobs: &Sender<Job>,
    confirmed: Receiver<Vec<u64>>,
) {
    let channel = connection.open_channel(None).unwrap();
    channel.qos(0, window, false).unwrap();
    let consumer = channel
        .basic_consume(queue, ConsumerOptions::default())
        .unwrap();
    // Unacked deliveries in tag order, each with whether its status is confirmed.
    let mut unacked: VecDeque<(Delivery, bool)> = VecDeque::new();
    let mut acked = 0;
    while acked < count {
        select! {
            recv(consumer.receiver()) -> message => {
                let Ok(ConsumerMessage::Delivery(delivery)) = message else {
                    panic!("the skeleton's consumer ended")
                };
                let job: serde_json::Value = serde_json::from_slice(&delivery.body).unwrap();
                let job_id = job["jobId"].as_str().unwrap().to_string();
                let tag = delivery.delivery_tag();
                unacked.push_back((delivery, false));
                jobs.send(Job { tag, job_id }).unwrap();
            }
            recv(confirmed) -> tags => {
                let first = unacked.front().map_or(0, |(d, _)| d.delivery_tag());
                for tag in tags.unwrap() {
                    unacked[(tag - first) as usize].1 = true;
                }
                let mut last = None;
                while unacked.front().is_some_and(|(_, done)| *done) {
                    last = unacked.pop_front().map(|(delivery, _)| delivery);
                    acked += 1;
                }
                if let Some(delivery) = last {
                    delivery.ack_multiple(&channel).unwrap();
                }
            }
        }
    }
}

/// The publisher thread: each status published with a confirm; per confirm, the
/// deliveries it completes to the consumer. Ends when the dispatch threads have.
fn publish(
    mut connection: Connection,
    exchange: &str,
    statuses: Receiver<(u64, String)>,
    confirmed: Sender<Vec<u64>>,
) {
    let channel = connection.open_channel(None).unwrap();
    let confirms = channel.listen_for_publisher_confirms().unwrap();
    channel.enable_publisher_confirms().unwrap();
    let mut smoother = ConfirmSmoother::new();
    let mut waiting: VecDeque<u64> = VecDeque::new();
    loop {
        select! {
            recv(statuses) -> status => {
                let Ok((tag, job_id)) = status else { break };
                let (body, properties) = status_message(&job_id);
                let message = Publish::with_properties(&body, "api.result", properties);
                channel.basic_publish(exchange, message).unwrap();
                waiting.push_back(tag);
            }
            recv(confirms) -> confirm => {
                let done: Vec<u64> = smoother
                    .process(confirm.unwrap())
                    .map(|_| waiting.pop_front().unwrap())
                    .collect();
                if !done.is_empty() {
                    let _ = confirmed.send(done);
                }
            }
        }
    }
    let _ = connection.close();
}
