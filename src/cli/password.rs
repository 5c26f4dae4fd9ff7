//! The password `hash-password` hashes: typed twice on the terminal, without echo, or piped.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[cfg(test)]
use countersign::proxy::users::DEFAULT_MAX_PASSWORD_BYTES;
use rustix::termios::{self, LocalModes, OptionalActions, Termios};
use zeroize::Zeroizing;

/// The longest line a terminal in canonical mode passes on whole (Linux's N_TTY buffer is 4096
/// bytes, the line end included).
const TERMINAL_LINE_MAX: usize = 4095;

/// Room for a password of `max_bytes`, a `\r\n` line end and one byte more, to tell "too long"
/// from "just fits". Buffers are this size from the start, so no reallocation leaves a copy of
/// the password behind unzeroized.
fn line_cap(max_bytes: usize) -> usize {
    max_bytes.saturating_add(3)
}

/// The password piped to `hash-password`: exactly one line of at most `max_bytes` (see
/// [`password_line`]). At most [`line_cap`] bytes are read, so the input is bounded.
pub fn read_piped(input: impl io::Read, max_bytes: usize) -> Result<Zeroizing<String>, String> {
    let cap = line_cap(max_bytes);
    let mut bytes = Zeroizing::new(Vec::with_capacity(cap));
    if let Err(e) = input.take(cap as u64).read_to_end(&mut bytes) {
        return Err(format!("reading the password from stdin: {e}"));
    }
    password_line(&bytes, "stdin", max_bytes)
}

/// What came of the two prompts of [`read_typed_twice`].
pub enum Typed<T> {
    /// The same password twice: what the work given to [`read_typed_twice`] made of it.
    Same(T),
    /// Two different lines; nothing to hash.
    Differ,
    /// A signal ended the typing or the work (Ctrl-C is `SIGINT`, 2): the terminal has its
    /// settings back, and the command exits 128 + the signal's number, as a shell reports a
    /// killed command.
    Interrupted(u8),
}

/// The password typed on the controlling terminal, asked twice (`Password: `, then
/// `Password again: `): it is typed blind, and a typo would otherwise be hashed and found only
/// at a login that fails.
///
/// Echo goes off *before* the first prompt is written and comes back only after the second
/// line is read, also on an error and on Ctrl-C. A line typed or pasted as soon as a prompt
/// shows, or even ahead of it, is therefore never shown; turning echo off after writing the
/// prompt, as prompt-then-read helpers do, echoes a line that arrives in between. And a
/// Ctrl-C at a prompt does not leave the operator's shell without echo: `SIGINT`, `SIGQUIT`,
/// `SIGTERM` and `SIGHUP` are caught while the terminal is quiet, the settings put back, and
/// [`Typed::Interrupted`] returned.
///
/// `work` (the hashing) runs on the password once both lines match, with the signals still
/// caught: a Ctrl-C during a costly hash ends the command at once, with nothing printed.
/// Once caught, a signal cannot be given back its default action (tokio never uninstalls its
/// handlers), so without this a Ctrl-C during the hash would be ignored.
pub fn read_typed_twice<T: Send + 'static>(
    max_bytes: usize,
    work: impl FnOnce(Zeroizing<String>) -> T + Send + 'static,
) -> Result<Typed<T>, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(terminal_error)?;
    runtime.block_on(async {
        // Caught from before echo goes off, so no signal finds the terminal quiet and
        // nobody to restore it.
        let caught = [
            (SignalKind::interrupt(), 2),
            (SignalKind::quit(), 3),
            (SignalKind::terminate(), 15),
            (SignalKind::hangup(), 1),
        ];
        let mut signals = Vec::with_capacity(caught.len());
        for (kind, number) in caught {
            signals.push((signal(kind).map_err(terminal_error)?, number));
        }
        let tty = File::options()
            .read(true)
            .write(true)
            .open("/dev/tty")
            .map_err(terminal_error)?;
        let mut quiet = EchoOff::new(tty).map_err(terminal_error)?;
        let restore = quiet.restorer().map_err(terminal_error)?;
        // Whether the terminal is still quiet: a signal after that has a terminal to leave
        // alone (the line end typed last was already shown).
        let typing = Arc::new(AtomicBool::new(true));
        // The reads block and the work takes its time, so both run on their own thread
        // while this one waits for a signal. A signal ends the process with that thread
        // still blocked in `read` or busy hashing.
        let (typed, answer) = tokio::sync::oneshot::channel();
        let reading = Arc::clone(&typing);
        std::thread::spawn(move || {
            let both = quiet.ask("Password: ", max_bytes).and_then(|first| {
                let again = quiet.ask("Password again: ", max_bytes)?;
                Ok((first == again).then_some(first))
            });
            // `quiet` restores the terminal here, before the work.
            drop(quiet);
            reading.store(false, Ordering::Release);
            let _ = typed.send(both.map(|same| match same {
                Some(password) => Typed::Same(work(password)),
                None => Typed::Differ,
            }));
        });
        let any_signal = futures_util::future::select_all(
            signals
                .iter_mut()
                .map(|(stream, number)| Box::pin(async { stream.recv().await.map(|()| *number) })),
        );
        tokio::select! {
            both = answer => match both {
                Ok(both) => both,
                Err(_) => Err("reading the password: the reading thread failed".to_owned()),
            },
            // `None` only if the runtime's signal driver went away: that branch is then off.
            (Some(number), _, _) = any_signal => {
                if typing.load(Ordering::Acquire) {
                    restore.apply();
                    // The line the operator was typing is abandoned: the shell's prompt goes
                    // on the next one.
                    let _ = (&restore.tty).write_all(b"\n");
                }
                Ok(Typed::Interrupted(128 + number))
            }
        }
    })
}

/// The message for a failed read or write of the terminal.
fn terminal_error(e: io::Error) -> String {
    format!("reading the password from the terminal: {e}")
}

/// Puts a terminal's saved settings back, from another thread than the one reading it.
struct Restorer {
    tty: File,
    saved: Termios,
}

impl Restorer {
    fn apply(&self) {
        // Nothing better to do if this fails: the terminal is going away, or was never ours.
        let _ = termios::tcsetattr(&self.tty, OptionalActions::Now, &self.saved);
    }
}

/// The terminal with echo off (the line end still echoed, so the next output starts on a new
/// line) for as long as this lives; its settings are put back on drop.
struct EchoOff {
    tty: File,
    restore: Restorer,
}

impl EchoOff {
    fn new(tty: File) -> io::Result<Self> {
        let saved = termios::tcgetattr(&tty)?;
        let mut quiet = saved.clone();
        quiet.local_modes.remove(LocalModes::ECHO);
        quiet.local_modes.insert(LocalModes::ECHONL);
        let restore = Restorer {
            tty: tty.try_clone()?,
            saved,
        };
        // `Now`, not `Flush`: what was typed ahead of the prompt is kept (and, echo being
        // off from here on, never shown again).
        termios::tcsetattr(&tty, OptionalActions::Now, &quiet)?;
        Ok(Self { tty, restore })
    }

    /// Writes `prompt`, then reads one line. The terminal is in canonical mode, so each
    /// `read` returns at most one line: nothing typed ahead for the next prompt is consumed.
    fn ask(&mut self, prompt: &str, max_bytes: usize) -> Result<Zeroizing<String>, String> {
        self.tty
            .write_all(prompt.as_bytes())
            .map_err(terminal_error)?;
        self.tty.flush().map_err(terminal_error)?;
        let cap = line_cap(max_bytes);
        let mut bytes = Zeroizing::new(vec![0u8; cap]);
        let mut len = 0;
        while len < cap {
            let n = self.read_some(&mut bytes[len..]).map_err(terminal_error)?;
            len += n;
            // End of input (Ctrl-D), or the line's end.
            if n == 0 || bytes[..len].ends_with(b"\n") {
                break;
            }
        }
        if len == cap && !bytes.ends_with(b"\n") {
            // Too long, and refused below; the rest of the line is read here, or the shell
            // would take it as a command (and keep it in its history) once we exit.
            self.discard_line().map_err(terminal_error)?;
        }
        let password = password_line(&bytes[..len], "the terminal", max_bytes)?;
        // A terminal in canonical mode holds at most this many bytes of a line and drops the
        // rest unsaid (Linux's N_TTY): a longer password, pasted twice, would be cut the same
        // way twice and hashed as a password the user never meant.
        if password.len() >= TERMINAL_LINE_MAX {
            return Err(format!(
                "a line of {TERMINAL_LINE_MAX} bytes or more may have been cut by the \
                 terminal (its line limit): pipe a password this long to hash-password instead"
            ));
        }
        Ok(password)
    }

    fn restorer(&self) -> io::Result<Restorer> {
        Ok(Restorer {
            tty: self.restore.tty.try_clone()?,
            saved: self.restore.saved.clone(),
        })
    }

    fn discard_line(&mut self) -> io::Result<()> {
        let mut rest = Zeroizing::new([0u8; 512]);
        loop {
            let n = self.read_some(&mut rest[..])?;
            if n == 0 || rest[..n].ends_with(b"\n") {
                return Ok(());
            }
        }
    }

    /// One `read` of the terminal, tried again when a signal interrupts it.
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.tty.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                done => return done,
            }
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        self.restore.apply();
    }
}

/// One line of `bytes`, read from `source`: one trailing `\n` or `\r\n` is the line's end and
/// not part of it (`echo pw |` and `printf pw |` hash the same password); any other line break
/// is refused rather than cut off, since hashing only part of the input (the first line) would
/// make a password the user never meant. At most `max_bytes`, and UTF-8.
fn password_line(
    bytes: &[u8],
    source: &str,
    max_bytes: usize,
) -> Result<Zeroizing<String>, String> {
    let mut line = bytes;
    if let Some(rest) = line.strip_suffix(b"\n") {
        line = rest.strip_suffix(b"\r").unwrap_or(rest);
    }
    if line.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        return Err(format!(
            "the password on {source} must be one line: it contains a line break (besides \
             one line end)"
        ));
    }
    if line.len() > max_bytes {
        return Err(format!(
            "password longer than {max_bytes} bytes (--max-password-bytes)"
        ));
    }
    match std::str::from_utf8(line) {
        Ok(text) => Ok(Zeroizing::new(text.to_owned())),
        Err(_) => Err(format!(
            "reading the password from {source}: the password is not UTF-8"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_end_is_not_part_of_the_password() {
        for input in [&b"pw"[..], b"pw\n", b"pw\r\n"] {
            assert_eq!(
                password_line(input, "stdin", DEFAULT_MAX_PASSWORD_BYTES)
                    .unwrap()
                    .as_str(),
                "pw"
            );
        }
        // Only one line end goes: a second is a line break inside.
        let err = password_line(b"pw\n\n", "stdin", DEFAULT_MAX_PASSWORD_BYTES).unwrap_err();
        assert!(err.contains("must be one line"), "{err}");
        let err = password_line(b"p\rw", "the terminal", DEFAULT_MAX_PASSWORD_BYTES).unwrap_err();
        assert_eq!(
            err,
            "the password on the terminal must be one line: it contains a line break \
             (besides one line end)"
        );
    }

    #[test]
    fn length_is_checked_without_the_line_end() {
        for max in [1, 5, DEFAULT_MAX_PASSWORD_BYTES, 4096] {
            let longest = "x".repeat(max);
            let with_end = format!("{longest}\r\n");
            assert_eq!(
                password_line(with_end.as_bytes(), "stdin", max)
                    .unwrap()
                    .len(),
                max
            );
            let over = format!("{longest}x\n");
            let err = password_line(over.as_bytes(), "stdin", max).unwrap_err();
            let too_long = format!("password longer than {max} bytes (--max-password-bytes)");
            assert_eq!(err, too_long);
            // What `read_piped` reads is bounded: more than `line_cap` bytes is cut there, and
            // still refused as too long, not hashed.
            let flood = vec![b'x'; 10 * line_cap(max)];
            assert_eq!(read_piped(&flood[..], max).unwrap_err(), too_long);
            assert_eq!(read_piped(with_end.as_bytes(), max).unwrap().len(), max);
        }
    }

    #[test]
    fn not_utf8_is_refused_naming_the_source() {
        let err = password_line(b"\xff\xfe\n", "stdin", DEFAULT_MAX_PASSWORD_BYTES).unwrap_err();
        assert_eq!(
            err,
            "reading the password from stdin: the password is not UTF-8"
        );
    }
}
