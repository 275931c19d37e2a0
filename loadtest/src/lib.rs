//! weir-loadtest: simulated Matrix group-call participants with real WebRTC stacks, for finding
//! out what a focus machine holds. See `README` in the repository for how to run it.
//!
//! Sans-I/O parts (pure, unit-tested with simulated time): [`payload`] (the synthetic media
//! format), [`source`] (when to send what), [`stats`] and [`decoder`] (what receivers measure
//! and could show), [`impair`] (the network impairment model), [`call`] (the to-device call protocol), [`prom`] and [`report`].
//! I/O parts: [`matrix`] and [`signal`] (signalling), [`participant`] (one WebRTC client),
//! [`floor`] (the machine's per-packet floor) and [`run`] (one whole run).

pub mod call;
pub mod decoder;
pub mod floor;
pub mod ids;
pub mod impair;
pub mod links;
pub mod matrix;
pub mod participant;
pub mod payload;
pub mod prom;
pub mod report;
pub mod run;
pub mod seq_window;
pub mod signal;
pub mod source;
pub mod stats;
pub mod video_rx;

/// CPU seconds (user + system) this process has used so far.
pub fn own_cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage writes into the struct we pass; zeroed is a valid initial value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer has no other preconditions.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return None;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(tv(ru.ru_utime) + tv(ru.ru_stime))
}
