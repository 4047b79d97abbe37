//! A panic is never silent. tokio catches a panic inside a spawned task and
//! keeps the process running, so a server whose loop task panicked would
//! stay up without serving (issue 7, "poison pill"). The binaries install
//! [`exit_on_panic`]: any panic, in any thread or task, logs its message
//! and location and ends the process with [`EXIT_PANIC`], so systemd
//! restarts it and the operator sees why in one line.

use std::io::Write;

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
        // Not `eprintln!`: it panics when stderr is closed, and a panic in
        // the hook aborts the process without a word.
        let _ = writeln!(
            std::io::stderr(),
            "{program}: BUG: panic at {location} (thread {thread}): {message}; exiting with status {EXIT_PANIC}"
        );
        std::process::exit(EXIT_PANIC);
    }));
}

/// Writes command output to stdout. A closed stdout (`… | head`) is a
/// normal end for a command-line tool: the reader has what it wanted, so
/// the process ends quietly with status 0 instead of panicking. Other
/// write errors (a full disk) end it with EX_IOERR (74), said on stderr.
pub fn write_stdout(args: std::fmt::Arguments<'_>, newline: bool) {
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| {
        if newline {
            out.write_all(b"\n")
        } else {
            Ok(())
        }
    });
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        write_stderr(format_args!("cannot write the output: {e}"), true);
        std::process::exit(74);
    }
}

/// Writes a message to stderr; a closed stderr loses the message, never
/// the process.
pub fn write_stderr(args: std::fmt::Arguments<'_>, newline: bool) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| {
        if newline {
            err.write_all(b"\n")
        } else {
            Ok(())
        }
    });
}

/// `println!` for command output: see [`write_stdout`].
#[macro_export]
macro_rules! outln {
    () => { $crate::fatal::write_stdout(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::fatal::write_stdout(format_args!($($arg)*), true) };
}

/// `print!` for command output: see [`write_stdout`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::fatal::write_stdout(format_args!($($arg)*), false) };
}

/// `eprintln!` that never panics: see [`write_stderr`].
#[macro_export]
macro_rules! errln {
    () => { $crate::fatal::write_stderr(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::fatal::write_stderr(format_args!($($arg)*), true) };
}

/// `eprint!` that never panics.
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => { $crate::fatal::write_stderr(format_args!($($arg)*), false) };
}
