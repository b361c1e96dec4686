//! A `RunJob` call. With `streamLogs` (`--logs-key` set) it is read as a server stream:
//! our worker sends the build's output in messages ahead of its answer. Otherwise it is
//! a unary call, which is the same on the wire (any worker, a Go one too, answers with
//! one message) and costs grpcio one batch instead of one per message and one for the
//! end.

use std::future::poll_fn;
use std::pin::Pin;

use futures_core::Stream;
use grpcio::{CallOption, ClientSStreamReceiver, ClientUnaryReceiver, RpcStatus, RpcStatusCode};

use crate::grpc::cancel::{self, CallError, CancelToken};
use crate::grpc::RUN_JOB_STREAM;
use crate::proto::job::{JobRequest, JobResponse};
use crate::proto::job_grpc::JobServiceClient;

/// A `RunJob` call in flight.
pub(super) enum RunCall {
    /// Read as a stream: output, then the answer.
    Stream(ClientSStreamReceiver<JobResponse>),
    /// The answer alone.
    Unary(ClientUnaryReceiver<JobResponse>),
}

/// Whether a message of the call carries output lines rather than the answer.
fn is_output(message: &JobResponse) -> bool {
    !message.logLines.is_empty() || message.logLinesDropped > 0
}

impl RunCall {
    /// Starts the call, as a stream when the worker is to send its output.
    pub(super) fn start(
        client: &JobServiceClient,
        request: &JobRequest,
        options: CallOption,
    ) -> grpcio::Result<RunCall> {
        if !request.streamLogs {
            return client
                .run_job_async_opt(request, options)
                .map(RunCall::Unary);
        }
        let stream = client
            .client
            .server_streaming(&RUN_JOB_STREAM, request, options)?;
        Ok(RunCall::Stream(stream))
    }

    /// Waits for the answer (or `token`), handing every message of output to `output`
    /// on the way. When `token` fires first, the call is left running: the caller
    /// decides what to tell the worker before it cancels the call.
    pub(super) fn answer(
        &mut self,
        token: &CancelToken,
        mut output: impl FnMut(JobResponse),
    ) -> Result<JobResponse, CallError> {
        let stream = match self {
            RunCall::Unary(call) => return cancel::wait(call, Some(token)),
            RunCall::Stream(stream) => stream,
        };
        loop {
            let next = poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx));
            match cancel::block_on(next, Some(token)) {
                Err(reason) => return Err(CallError::Cancelled(reason)),
                Ok(Some(Ok(message))) if is_output(&message) => output(message),
                Ok(Some(Ok(answer))) => return Ok(answer),
                Ok(Some(Err(e))) => return Err(CallError::Grpc(e)),
                Ok(None) => {
                    let status = RpcStatus::with_message(
                        RpcStatusCode::UNKNOWN,
                        "the worker ended the call without an answer".into(),
                    );
                    return Err(CallError::Grpc(grpcio::Error::RpcFailure(status)));
                }
            }
        }
    }

    /// Ends our side of the call now. The C core passes the cancel down the call's
    /// stack even when the call has ended; dropping the call cancels it only if it has
    /// not.
    pub(super) fn cancel(&mut self) {
        match self {
            RunCall::Stream(stream) => stream.cancel(),
            RunCall::Unary(call) => call.cancel(),
        }
    }
}
