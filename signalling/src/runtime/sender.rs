//! The sender task: `PUT /sendToDevice`, one request at a time per leg (a negotiate never
//! overtakes the answer of the same leg), several legs in parallel, bounded retries with
//! backoff.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, error, warn};

use crate::client::MatrixClient;
use crate::ids::CallId;
use crate::metrics::Metrics;
use crate::wire::{DropReason, OutgoingToDevice};

pub(super) struct SenderTask {
    client: MatrixClient,
    metrics: Metrics,
    max_parallel: usize,
    max_queued: usize,
    boot: String,
    txn_counter: u64,
    queues: HashMap<CallId, VecDeque<(OutgoingToDevice, String)>>,
    in_flight: HashSet<CallId>,
    ready: VecDeque<CallId>,
    queued: usize,
}

const SEND_ATTEMPTS: u32 = 5;

impl SenderTask {
    pub(super) fn new(
        client: MatrixClient,
        metrics: Metrics,
        max_parallel: usize,
        max_queued: usize,
    ) -> Self {
        Self {
            client,
            metrics,
            max_parallel,
            max_queued,
            boot: format!("{:016x}", rand::random::<u64>()),
            txn_counter: 0,
            queues: HashMap::new(),
            in_flight: HashSet::new(),
            ready: VecDeque::new(),
            queued: 0,
        }
    }

    fn enqueue(&mut self, out: OutgoingToDevice) {
        if self.queued >= self.max_queued {
            warn!(event_type = out.event_type, call = %out.call_id, "send queue full; dropped");
            self.metrics.drop(DropReason::QueueFull);
            return;
        }
        self.txn_counter += 1;
        let txn = format!("weir.{}.{}", self.boot, self.txn_counter);
        let call = out.call_id.clone();
        let q = self.queues.entry(call.clone()).or_default();
        let was_idle = q.is_empty() && !self.in_flight.contains(&call);
        q.push_back((out, txn));
        self.queued += 1;
        if was_idle {
            self.ready.push_back(call);
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<OutgoingToDevice>) {
        let mut jobs: JoinSet<CallId> = JoinSet::new();
        let mut open = true;
        loop {
            while jobs.len() < self.max_parallel {
                let Some(call) = self.ready.pop_front() else {
                    break;
                };
                let Some((out, txn)) = self.queues.get_mut(&call).and_then(VecDeque::pop_front)
                else {
                    continue;
                };
                self.queued -= 1;
                self.in_flight.insert(call.clone());
                let client = self.client.clone();
                let metrics = self.metrics.clone();
                jobs.spawn(async move {
                    send_with_retries(&client, &metrics, &out, &txn).await;
                    out.call_id
                });
            }
            if !open && jobs.is_empty() && self.queued == 0 {
                break;
            }
            tokio::select! {
                msg = rx.recv(), if open => match msg {
                    Some(out) => self.enqueue(out),
                    None => open = false,
                },
                Some(done) = jobs.join_next(), if !jobs.is_empty() => {
                    let call = match done {
                        Ok(c) => c,
                        Err(e) => { error!(error = %e, "send job failed"); continue; }
                    };
                    self.in_flight.remove(&call);
                    if self.queues.get(&call).is_some_and(|q| !q.is_empty()) {
                        self.ready.push_back(call);
                    } else {
                        self.queues.remove(&call);
                    }
                }
            }
        }
    }
}

async fn send_with_retries(
    client: &MatrixClient,
    metrics: &Metrics,
    out: &OutgoingToDevice,
    txn: &str,
) {
    let messages = match out.messages() {
        Ok(m) => m,
        Err(e) => {
            error!(event_type = out.event_type, call = %out.call_id, error = %e, "could not serialise; not sent");
            return metrics.drop(DropReason::SendFailed);
        }
    };
    let mut backoff = Duration::from_millis(250);
    for attempt in 1..=SEND_ATTEMPTS {
        match client
            .send_to_device(out.event_type, txn, messages.clone())
            .await
        {
            Ok(()) => {
                metrics.sent.with_label_values(&[out.event_type]).inc();
                debug!(event_type = out.event_type, call = %out.call_id, to = %out.to_user, "sent");
                return;
            }
            Err(e) if e.is_transient() && attempt < SEND_ATTEMPTS => {
                warn!(event_type = out.event_type, call = %out.call_id, attempt, error = %e, "send failed; retrying");
                tokio::time::sleep(
                    e.retry_after()
                        .unwrap_or(backoff)
                        .min(Duration::from_secs(10)),
                )
                .await;
                backoff *= 2;
            }
            Err(e) => {
                error!(event_type = out.event_type, call = %out.call_id, error = %e, "send failed; giving up");
                metrics.drop(if e.status() == Some(413) {
                    DropReason::TooLarge
                } else {
                    DropReason::SendFailed
                });
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn sender_keeps_per_leg_order_and_bounds_the_queue() {
        let client = MatrixClient::new("http://127.0.0.1:9").unwrap();
        let mut s = SenderTask::new(client, Metrics::unregistered().unwrap(), 2, 3);
        let out = |call: &str, ty: &'static str| OutgoingToDevice {
            event_type: ty,
            to_user: "@u:hs".try_into().unwrap(),
            to_device: "D".into(),
            call_id: call.into(),
            content: json!({}),
        };
        s.enqueue(out("a", "m.call.answer"));
        s.enqueue(out("a", "m.call.negotiate"));
        s.enqueue(out("b", "m.call.answer"));
        s.enqueue(out("c", "m.call.answer"));
        assert_eq!(s.metrics.dropped_count(DropReason::QueueFull), 1);
        // Leg "a" is ready once, with its answer ahead of its negotiate.
        assert_eq!(
            s.ready,
            VecDeque::from([CallId::from("a"), CallId::from("b")])
        );
        let q: Vec<&str> = s.queues[&CallId::from("a")]
            .iter()
            .map(|(o, _)| o.event_type)
            .collect();
        assert_eq!(q, ["m.call.answer", "m.call.negotiate"]);
        let txns: HashSet<&String> = s.queues.values().flatten().map(|(_, t)| t).collect();
        assert_eq!(txns.len(), 3, "transaction ids are unique");
    }
}
