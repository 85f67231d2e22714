//! Log lines as the journal wants them. Under systemd (`JOURNAL_STREAM` is
//! set and stderr is that stream) each line starts with its syslog priority
//! (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug), so `journalctl -p
//! warning` finds warnings, and carries no timestamp of its own (the journal
//! adds one), no level word (the priority is the level), no colour, and
//! plain values (`pid=263`, not `pid=Some(263)`). On a terminal, the usual
//! coloured, timed lines.

use std::io::IsTerminal as _;

use tracing::{Event, Level, Subscriber, field::Field};
use tracing_subscriber::{
    field::{RecordFields, Visit},
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// Installs the process's log subscriber (level from `RUST_LOG`, default info).
pub fn init() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if to_journal() {
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_level(false);
        builder
            .fmt_fields(PlainFields)
            .event_format(Prioritised(format))
            .init();
    } else {
        builder.init();
    }
}

/// Whether stderr is the journal's stream (systemd.exec(5): `JOURNAL_STREAM`
/// names the device and inode of the stream it connected).
fn to_journal() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// journald's socket for structured records (the native protocol).
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Sends one structured record to the journal (systemd's native protocol:
/// `KEY=value` lines in one datagram; a value with a newline in the binary
/// form). Keys are upper case, digits and `_`. An error when there is no
/// journal (not under systemd).
pub fn send_record(fields: &[(&str, String)]) -> std::io::Result<()> {
    let mut datagram = Vec::new();
    for (key, value) in fields {
        datagram.extend_from_slice(key.as_bytes());
        if value.contains('\n') {
            datagram.push(b'\n');
            datagram.extend_from_slice(&(value.len() as u64).to_le_bytes());
        } else {
            datagram.push(b'=');
        }
        datagram.extend_from_slice(value.as_bytes());
        datagram.push(b'\n');
    }
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    socket.send_to(&datagram, JOURNAL_SOCKET)?;
    Ok(())
}

/// Whether this process logs to the journal (its stderr is the journal's
/// stream).
pub fn under_journal() -> bool {
    to_journal()
}

/// The syslog priority of a level (sd-daemon(3)).
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// A format that prefixes each line with `<priority>`: every line, so a
/// message that spans several (a tool's output in an error) keeps its
/// priority on each.
struct Prioritised<F>(F);

/// `text` with `<priority>` before each of its lines, each ending in `\n`.
fn prefix_lines(priority: u8, text: &str) -> String {
    text.trim_end_matches('\n')
        .split('\n')
        .map(|line| format!("<{priority}>{line}\n"))
        .collect()
}

impl<S, N, F> FormatEvent<S, N> for Prioritised<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut text = String::new();
        self.0.format_event(ctx, Writer::new(&mut text), event)?;
        writer.write_str(&prefix_lines(priority(event.metadata().level()), &text))
    }
}

/// Fields as `key=value`, the message first and bare; an optional value as
/// its content (`Some(263)` reads `263`) or, when absent, not at all.
struct PlainFields;

impl<'w> FormatFields<'w> for PlainFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut visitor = PlainVisitor {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: std::fmt::Result,
}

impl PlainVisitor<'_, '_> {
    fn write(&mut self, field: &Field, value: &str) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        let space = if self.first { "" } else { " " };
        self.first = false;
        self.result = if field.name() == "message" {
            write!(self.writer, "{space}{value}")
        } else {
            write!(self.writer, "{space}{}={value}", field.name())
        };
    }
}

/// `value` without an `Option`'s debug wrapping; `None` when it is `None`.
fn plain(value: &str) -> Option<&str> {
    if value == "None" {
        return None;
    }
    Some(
        value
            .strip_prefix("Some(")
            .and_then(|v| v.strip_suffix(')'))
            .unwrap_or(value),
    )
}

impl Visit for PlainVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message"
            || !value.contains(|c: char| c.is_whitespace() || c == '"' || c == '=')
        {
            self.write(field, value);
        } else {
            self.write(field, &format!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.write(field, &text);
        } else if let Some(value) = plain(&text) {
            self.write(field, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_carries_the_priority() {
        assert_eq!(prefix_lines(4, "a: b\n"), "<4>a: b\n");
        assert_eq!(prefix_lines(3, "a: b\nnft: c\n"), "<3>a: b\n<3>nft: c\n");
        assert_eq!(prefix_lines(6, "x"), "<6>x\n");
    }

    #[test]
    fn optional_values_are_written_plainly() {
        assert_eq!(plain("Some(263)"), Some("263"));
        assert_eq!(plain("Some(\"x\")"), Some("\"x\""));
        assert_eq!(plain("None"), None);
        assert_eq!(plain("42"), Some("42"));
        assert_eq!(plain("Something"), Some("Something"));
    }

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
    }
}
