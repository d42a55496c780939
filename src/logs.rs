//! Log setup: JSON lines on stderr, written by a background thread so no request waits on I/O.

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Keep the guard alive until exit: dropping it flushes.
/// `TOLLGATE_LOG` overrides the filter (e.g. `debug`, or `warn,tollgate::access=off`).
pub fn init() -> WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .finish(std::io::stderr());
    let filter = EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("warn,tollgate=info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_current_span(false)
        .with_env_filter(filter)
        .with_writer(writer)
        .try_init();
    guard
}
