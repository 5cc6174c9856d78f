//! Standard output as Unix tools use it: when the reader goes away (`updatepipe status |
//! head -1`, `grep -q`), the command ends quietly with exit code 0, instead of panicking on
//! the broken pipe (`println!` does). Every line the tool prints goes through [`outln!`].

use std::fmt;
use std::io::{self, Write};

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
    let mut out = io::stdout().lock();
    if let Err(e) = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
    {
        gone(&e);
    }
}

/// Standard output failed: a reader that went away ends the command quietly (exit 0);
/// anything else is said on standard error (exit 1).
pub(crate) fn gone(e: &io::Error) -> ! {
    if e.kind() == io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("updatepipe: cannot write to standard output: {e}");
    std::process::exit(1);
}
