//! Prometheus metrics of the signalling side. Every label value is from a fixed set.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::room::RefuseReason;
use crate::wire::DropReason;

/// Counters registered into the focus's registry (or a private one in tests).
#[derive(Clone, Debug)]
pub struct Metrics {
    pub received: IntCounterVec,
    pub sent: IntCounterVec,
    pub dropped: IntCounterVec,
    pub refused: IntCounterVec,
    pub sync_errors: IntCounter,
    pub sync_requests: IntCounter,
    /// Transactions the homeserver pushed (the focus as an application service).
    pub appservice_transactions: IntCounter,
    pub seq_gaps: IntCounter,
    pub unknown_call_hangups: IntCounter,
    pub legs: IntGauge,
}

impl Metrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::unregistered()?;
        registry.register(Box::new(m.received.clone()))?;
        registry.register(Box::new(m.sent.clone()))?;
        registry.register(Box::new(m.dropped.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        registry.register(Box::new(m.sync_errors.clone()))?;
        registry.register(Box::new(m.sync_requests.clone()))?;
        registry.register(Box::new(m.appservice_transactions.clone()))?;
        registry.register(Box::new(m.seq_gaps.clone()))?;
        registry.register(Box::new(m.unknown_call_hangups.clone()))?;
        registry.register(Box::new(m.legs.clone()))?;
        Ok(m)
    }

    /// Metrics registered nowhere (unit tests, tools).
    pub fn unregistered() -> Result<Self, prometheus::Error> {
        Ok(Self {
            received: IntCounterVec::new(
                Opts::new(
                    "weir_todevice_received_total",
                    "To-device events received, by type (unknown types as 'other')",
                ),
                &["type"],
            )?,
            sent: IntCounterVec::new(
                Opts::new(
                    "weir_todevice_sent_total",
                    "To-device events sent successfully, by type",
                ),
                &["type"],
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "weir_todevice_dropped_total",
                    "To-device events dropped (incoming or outgoing), by reason",
                ),
                &["reason"],
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "weir_invites_refused_total",
                    "m.call.invite refused by authorisation, by reason",
                ),
                &["reason"],
            )?,
            sync_errors: IntCounter::new("weir_sync_errors_total", "Failed /sync requests")?,
            sync_requests: IntCounter::new("weir_sync_requests_total", "/sync requests made")?,
            appservice_transactions: IntCounter::new(
                "weir_appservice_transactions_total",
                "Transactions the homeserver pushed to the focus as an application service",
            )?,
            seq_gaps: IntCounter::new(
                "weir_todevice_seq_gaps_total",
                "seq numbers skipped after the reorder timeout expired",
            )?,
            unknown_call_hangups: IntCounter::new(
                "weir_unknown_call_hangups_total",
                "m.call.hangup replies sent for events naming an unknown call_id",
            )?,
            legs: IntGauge::new(
                "weir_signalling_legs",
                "Call legs currently known to the router",
            )?,
        })
    }

    pub fn drop(&self, reason: DropReason) {
        self.dropped.with_label_values(&[reason.as_str()]).inc();
    }

    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        self.dropped.with_label_values(&[reason.as_str()]).get()
    }

    pub fn refuse(&self, reason: RefuseReason) {
        self.refused.with_label_values(&[reason.as_str()]).inc();
    }

    pub fn refused_count(&self, reason: RefuseReason) -> u64 {
        self.refused.with_label_values(&[reason.as_str()]).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_the_documented_names() {
        let reg = Registry::new();
        let m = Metrics::new(&reg).unwrap();
        m.drop(DropReason::WrongSession);
        m.refuse(RefuseReason::NotInRoom);
        m.received.with_label_values(&["m.call.invite"]).inc();
        m.sent.with_label_values(&["m.call.answer"]).inc();
        m.sync_errors.inc();
        m.sync_requests.inc();
        let names: Vec<String> = reg.gather().iter().map(|f| f.name().to_owned()).collect();
        for n in [
            "weir_todevice_received_total",
            "weir_todevice_sent_total",
            "weir_todevice_dropped_total",
            "weir_invites_refused_total",
            "weir_sync_errors_total",
            "weir_sync_requests_total",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
        assert_eq!(m.dropped_count(DropReason::WrongSession), 1);
        // Registering twice into one registry fails loudly instead of silently splitting counts.
        assert!(Metrics::new(&reg).is_err());
    }
}
