//! A `RunJob` call read as a server stream: with `streamLogs`, our worker sends the
//! build's output in messages ahead of its answer; any worker (a Go one too) sends the
//! answer as the one message such a call has otherwise (the same on the wire as unary).

use std::future::poll_fn;
use std::pin::Pin;

use futures_core::Stream;
use grpcio::{CallOption, ClientSStreamReceiver, RpcStatus, RpcStatusCode};

use crate::grpc::cancel::{self, CallError, CancelToken};
use crate::grpc::RUN_JOB_STREAM;
use crate::proto::job::{JobRequest, JobResponse};
use crate::proto::job_grpc::JobServiceClient;

/// A `RunJob` call in flight.
pub(super) struct RunCall {
    stream: ClientSStreamReceiver<JobResponse>,
}

/// Whether a message of the call carries output lines rather than the answer.
fn is_output(message: &JobResponse) -> bool {
    !message.logLines.is_empty() || message.logLinesDropped > 0
}

impl RunCall {
    /// Starts the call.
    pub(super) fn start(
        client: &JobServiceClient,
        request: &JobRequest,
        options: CallOption,
    ) -> grpcio::Result<RunCall> {
        let stream = client
            .client
            .server_streaming(&RUN_JOB_STREAM, request, options)?;
        Ok(RunCall { stream })
    }

    /// Waits for the answer (or `token`), handing every message of output to `output`
    /// on the way. When `token` fires first, the call is left running: the caller
    /// decides what to tell the worker before it cancels the call.
    pub(super) fn answer(
        &mut self,
        token: &CancelToken,
        mut output: impl FnMut(JobResponse),
    ) -> Result<JobResponse, CallError> {
        loop {
            let next = poll_fn(|cx| Pin::new(&mut self.stream).poll_next(cx));
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
        self.stream.cancel();
    }
}
