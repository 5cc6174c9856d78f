//! Standard output as Unix tools use it: when the reader goes away (`updatepipe status |
//! head -1`, `grep -q`), the command ends quietly with exit code 0, instead of panicking on
//! the broken pipe (`println!` does). Every line the tool prints goes through [`outln!`].

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;

/// Set by a command that must clean up before it ends (`bench` drops its database): a
/// reader gone then tells it here instead of ending the process.
static WIND_DOWN: OnceLock<Arc<Notify>> = OnceLock::new();

/// The reader went away (only kept while a command winds down by itself).
static GONE: AtomicBool = AtomicBool::new(false);

/// From now on a reader that goes away does not end the process: the returned `Notify`
/// is told, the command winds down by itself (and ends with exit code 0), and what it
/// prints meanwhile is dropped.
pub(crate) fn wind_down_when_gone() -> Arc<Notify> {
    WIND_DOWN.get_or_init(|| Arc::new(Notify::new())).clone()
}

/// Prints a line on standard output, as `println!`; a reader gone ends the process
/// quietly.
macro_rules! outln {
    () => {
        $crate::output::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Writes one line (standard output is line-buffered: the write reaches the reader, or
/// fails, here).
pub(crate) fn line(args: fmt::Arguments<'_>) {
    if GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = io::stdout().lock();
    if let Err(e) = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
    {
        gone(&e);
    }
}

/// Standard output failed: a reader that went away ends the command quietly (exit 0), or
/// tells a command that winds down by itself ([`wind_down_when_gone`]); anything else is
/// said on standard error (exit 1).
fn gone(e: &io::Error) {
    if e.kind() == io::ErrorKind::BrokenPipe {
        if let Some(wind_down) = WIND_DOWN.get() {
            GONE.store(true, Ordering::Relaxed);
            wind_down.notify_one();
            return;
        }
        std::process::exit(0);
    }
    eprintln!("updatepipe: cannot write to standard output: {e}");
    std::process::exit(1);
}
