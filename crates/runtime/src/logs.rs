//! Per-service capture of guest stdout and stderr, plus platform events, in a bounded ring.
//!
//! A guest that prints without end must not grow the node's memory: the ring keeps the last
//! [`ServiceLog::LINES_MAX`] lines and cuts each line at [`ServiceLog::LINE_BYTES_MAX`].
//! Readers page through it by sequence number, so `maru logs --follow` never misses a line
//! that is still in the ring and can say how many it missed when it fell behind.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWrite;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
    /// Events written by the platform about the service (instance started, trapped, ...).
    Platform,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Platform => "maru",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub sequence: u64,
    pub unix_ms: u64,
    pub stream: LogStream,
    pub text: String,
}

#[derive(Debug, Default)]
struct Ring {
    lines: VecDeque<LogLine>,
    next_sequence: u64,
}

/// The log of one service, shared by all its instances.
#[derive(Debug, Default)]
pub struct ServiceLog {
    ring: Mutex<Ring>,
}

impl ServiceLog {
    pub const LINES_MAX: usize = 2000;
    pub const LINE_BYTES_MAX: usize = 4096;

    pub fn new() -> Arc<Self> {
        Arc::new(ServiceLog::default())
    }

    pub fn push(&self, stream: LogStream, text: &str) {
        let mut text = text.trim_end_matches(['\r', '\n']).to_string();
        if text.len() > Self::LINE_BYTES_MAX {
            let mut cut = Self::LINE_BYTES_MAX;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str(" …[line cut]");
        }
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut ring = self
            .ring
            .lock()
            .expect("log ring lock is never poisoned: no panics while held");
        let sequence = ring.next_sequence;
        ring.next_sequence += 1;
        if ring.lines.len() == Self::LINES_MAX {
            ring.lines.pop_front();
        }
        ring.lines.push_back(LogLine {
            sequence,
            unix_ms,
            stream,
            text,
        });
    }

    /// Lines with a sequence number of at least `from`, at most `limit` of them, and the
    /// sequence number to ask for next.
    pub fn read(&self, from: u64, limit: usize) -> (Vec<LogLine>, u64) {
        let ring = self
            .ring
            .lock()
            .expect("log ring lock is never poisoned: no panics while held");
        let lines: Vec<LogLine> = ring
            .lines
            .iter()
            .filter(|l| l.sequence >= from)
            .take(limit)
            .cloned()
            .collect();
        let next = lines
            .last()
            .map(|l| l.sequence + 1)
            .unwrap_or(ring.next_sequence);
        (lines, next)
    }

    /// A writer for one guest stream; each instance gets its own, so partial lines from
    /// different instances never interleave.
    pub(crate) fn writer(self: &Arc<Self>, stream: LogStream) -> LineWriter {
        LineWriter {
            log: self.clone(),
            stream,
            partial: Vec::new(),
        }
    }
}

/// Splits a byte stream into lines and pushes each into the service log.
pub(crate) struct LineWriter {
    log: Arc<ServiceLog>,
    stream: LogStream,
    partial: Vec<u8>,
}

impl LineWriter {
    fn take(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if byte == b'\n' {
                self.flush_partial();
            } else if self.partial.len() < ServiceLog::LINE_BYTES_MAX + 1 {
                self.partial.push(byte);
            }
        }
    }

    fn flush_partial(&mut self) {
        if !self.partial.is_empty() {
            self.log
                .push(self.stream, &String::from_utf8_lossy(&self.partial));
            self.partial.clear();
        }
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        self.flush_partial();
    }
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.take(bytes);
        Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.flush_partial();
        Poll::Ready(Ok(()))
    }
}

/// What wasmtime-wasi asks for: something that can hand out writers for a guest stream.
pub(crate) struct GuestOutput {
    pub(crate) log: Arc<ServiceLog>,
    pub(crate) stream: LogStream,
}

impl wasmtime_wasi::cli::IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.log.writer(self.stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    #[tokio::test]
    async fn splits_lines_and_bounds_the_ring() {
        let log = ServiceLog::new();
        let mut writer = log.writer(LogStream::Stdout);
        writer.write_all(b"one\ntw").await.expect("write");
        writer.write_all(b"o\nthree").await.expect("write");
        drop(writer);
        let (lines, next) = log.read(0, 10);
        let texts: Vec<_> = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["one", "two", "three"]);
        assert_eq!(next, 3);
        for i in 0..ServiceLog::LINES_MAX + 5 {
            log.push(LogStream::Platform, &format!("event {i}"));
        }
        let (lines, _) = log.read(0, usize::MAX);
        assert_eq!(lines.len(), ServiceLog::LINES_MAX);
        assert_eq!(lines[0].sequence, 8);
        assert_eq!(log.read(next + 10_000, 10).0.len(), 0);
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let log = ServiceLog::new();
        log.push(LogStream::Stderr, &"é".repeat(ServiceLog::LINE_BYTES_MAX));
        let (lines, _) = log.read(0, 1);
        assert!(lines[0].text.ends_with("[line cut]"));
        assert!(lines[0].text.len() < ServiceLog::LINE_BYTES_MAX + 20);
    }
}
