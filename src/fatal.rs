//! A panic is never silent. tokio catches a panic inside a spawned task and
//! keeps the process running, so a server whose loop task panicked would
//! stay up without serving (issue 7, "poison pill"). The binaries install
//! [`exit_on_panic`]: any panic, in any thread or task, logs its message
//! and location and ends the process with [`EXIT_PANIC`], so systemd
//! restarts it and the operator sees why in one line.

/// Exit status after a panic (sysexits EX_SOFTWARE).
pub const EXIT_PANIC: i32 = 70;

/// Installs the panic hook of the binaries. `program` names the binary in
/// the log line.
pub fn exit_on_panic(program: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_else(|| "unknown location".into());
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(non-text panic payload)".into());
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        tracing::error!(%location, %message, thread = %thread, "BUG: panic; exiting with status {EXIT_PANIC} so the service manager restarts {program}");
        eprintln!(
            "{program}: BUG: panic at {location} (thread {thread}): {message}; exiting with status {EXIT_PANIC}"
        );
        std::process::exit(EXIT_PANIC);
    }));
}
