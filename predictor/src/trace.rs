//! Reading lock-request traces: the format of `shared/traces/README.md`.
//!
//! A trace is a CSV file, plain or gzip-compressed (detected from the first two
//! bytes, not the file name), whose header line is exactly
//! `ts_us,client,key,mode,hold_us`. Each row is one lock acquisition; rows are
//! sorted by `ts_us`. Keys are kept only as their 64-bit hash ([`crate::key_hash`]),
//! which is how the live system names them too.
//!
//! Every error names the line (1-based, the header is line 1) and what was wrong.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// The header line every trace starts with.
pub const HEADER: &str = "ts_us,client,key,mode,hold_us";

/// Longest key the trace format allows, in bytes.
pub const KEY_BYTES_MAX: usize = 64;

/// Lock mode of one acquisition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Exclusive,
    Shared,
}

/// One row of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceEvent {
    pub ts_us: u64,
    pub client: u32,
    pub key_hash: u64,
    pub mode: Mode,
    pub hold_us: u64,
}

/// A whole trace in memory.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub events: Vec<TraceEvent>,
    /// Number of distinct keys (by hash).
    pub keys_distinct: usize,
}

impl Trace {
    /// Builds a trace from events already in memory (synthetic streams, slices).
    ///
    /// # Panics
    /// If the events are not sorted by `ts_us`.
    pub fn from_events(events: Vec<TraceEvent>) -> Trace {
        assert!(
            events.windows(2).all(|w| w[0].ts_us <= w[1].ts_us),
            "trace events must be sorted by ts_us"
        );
        let keys_distinct = events
            .iter()
            .map(|e| e.key_hash)
            .collect::<HashSet<_>>()
            .len();
        Trace {
            events,
            keys_distinct,
        }
    }

    /// The first `rows` events, as a trace of their own (for quick tests).
    pub fn head(&self, rows: usize) -> Trace {
        Trace::from_events(self.events[..rows.min(self.events.len())].to_vec())
    }

    /// Duration from the first to the last row.
    pub fn duration_us(&self) -> u64 {
        match (self.events.first(), self.events.last()) {
            (Some(first), Some(last)) => last.ts_us - first.ts_us,
            _ => 0,
        }
    }
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot open trace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "trace line {line}: read failed: {source} (a truncated or corrupted .gz file gives this; check it with `gzip -t`)"
    )]
    Read { line: u64, source: std::io::Error },
    #[error("the trace is empty: expected the header line `{HEADER}`")]
    Empty,
    #[error(
        "trace line 1: the header is {found:?}, expected {expected:?}; is this a forelock lock-request trace (see shared/traces/README.md)?"
    )]
    Header {
        found: String,
        expected: &'static str,
    },
    #[error("trace line {line}: expected 5 comma-separated fields ({HEADER}), found {found}")]
    FieldCount { line: u64, found: usize },
    #[error("trace line {line}: field `{field}` is {value:?}: {reason}")]
    Field {
        line: u64,
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "trace line {line}: ts_us {ts_us} is before the previous row's {previous_ts_us}; rows must be sorted ascending by ts_us"
    )]
    Unsorted {
        line: u64,
        ts_us: u64,
        previous_ts_us: u64,
    },
}

/// Reads a trace file, plain or gzip (detected by its magic bytes `1f 8b`).
pub fn read_trace_file(path: &Path) -> Result<Trace, TraceError> {
    let open = || {
        File::open(path).map_err(|source| TraceError::Open {
            path: path.to_owned(),
            source,
        })
    };
    let mut magic = [0u8; 2];
    let magic_len = open()?
        .read(&mut magic)
        .map_err(|source| TraceError::Read { line: 1, source })?;
    let file = open()?;
    if magic_len == 2 && magic == [0x1f, 0x8b] {
        parse_trace(BufReader::with_capacity(
            1 << 16,
            flate2::read::MultiGzDecoder::new(file),
        ))
    } else {
        parse_trace(BufReader::with_capacity(1 << 16, file))
    }
}

/// Parses a trace from any buffered reader.
pub fn parse_trace<R: BufRead>(mut reader: R) -> Result<Trace, TraceError> {
    let mut line_text = String::new();
    let mut line: u64 = 1;
    let read = reader
        .read_line(&mut line_text)
        .map_err(|source| TraceError::Read { line, source })?;
    if read == 0 {
        return Err(TraceError::Empty);
    }
    let header = line_text.trim_end_matches(['\n', '\r']);
    if header != HEADER {
        return Err(TraceError::Header {
            found: header.to_owned(),
            expected: HEADER,
        });
    }
    let mut events = Vec::new();
    let mut keys = HashSet::new();
    let mut previous_ts_us = 0u64;
    loop {
        line_text.clear();
        line += 1;
        let read = reader
            .read_line(&mut line_text)
            .map_err(|source| TraceError::Read { line, source })?;
        if read == 0 {
            break;
        }
        let row = line_text.trim_end_matches(['\n', '\r']);
        if row.is_empty() {
            continue;
        }
        let event = parse_row(row, line)?;
        if event.ts_us < previous_ts_us {
            return Err(TraceError::Unsorted {
                line,
                ts_us: event.ts_us,
                previous_ts_us,
            });
        }
        previous_ts_us = event.ts_us;
        keys.insert(event.key_hash);
        events.push(event);
    }
    Ok(Trace {
        events,
        keys_distinct: keys.len(),
    })
}

fn parse_row(row: &str, line: u64) -> Result<TraceEvent, TraceError> {
    let mut fields = [""; 5];
    let mut found = 0usize;
    for field in row.split(',') {
        if found < fields.len() {
            fields[found] = field;
        }
        found += 1;
    }
    if found != fields.len() {
        return Err(TraceError::FieldCount { line, found });
    }
    let bad = |field: &'static str, value: &str, reason: &'static str| TraceError::Field {
        line,
        field,
        value: value.to_owned(),
        reason,
    };
    let ts_us = fields[0].parse::<u64>().map_err(|_| {
        bad(
            "ts_us",
            fields[0],
            "expected a non-negative integer (microseconds)",
        )
    })?;
    let client = fields[1]
        .parse::<u32>()
        .map_err(|_| bad("client", fields[1], "expected a small non-negative integer"))?;
    let key = fields[2];
    if key.is_empty() {
        return Err(bad("key", key, "the key is empty"));
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(bad("key", key, "the key is longer than 64 bytes"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') || key.contains('"') {
        return Err(bad(
            "key",
            key,
            "keys must be printable ASCII without quotes",
        ));
    }
    let mode = match fields[3] {
        "X" => Mode::Exclusive,
        "S" => Mode::Shared,
        other => return Err(bad("mode", other, "expected X (exclusive) or S (shared)")),
    };
    let hold_us = fields[4].parse::<u64>().map_err(|_| {
        bad(
            "hold_us",
            fields[4],
            "expected an integer >= 1 (microseconds)",
        )
    })?;
    if hold_us == 0 {
        return Err(bad(
            "hold_us",
            fields[4],
            "expected an integer >= 1 (microseconds)",
        ));
    }
    Ok(TraceEvent {
        ts_us,
        client,
        key_hash: crate::key_hash(key.as_bytes()),
        mode,
        hold_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn parse(text: &str) -> Result<Trace, TraceError> {
        parse_trace(text.as_bytes())
    }

    #[test]
    fn a_well_formed_trace_parses_with_hashed_keys() {
        let trace =
            parse("ts_us,client,key,mode,hold_us\n0,0,a,X,5\n3,1,b,S,1\n3,0,a,X,2\n").unwrap();
        assert_eq!(trace.events.len(), 3);
        assert_eq!(trace.keys_distinct, 2);
        assert_eq!(trace.events[0].key_hash, crate::key_hash(b"a"));
        assert_eq!(trace.events[1].mode, Mode::Shared);
        assert_eq!(trace.events[2].hold_us, 2);
        assert_eq!(trace.duration_us(), 3);
    }

    #[test]
    fn crlf_line_endings_are_accepted() {
        let trace = parse("ts_us,client,key,mode,hold_us\r\n0,0,a,X,5\r\n").unwrap();
        assert_eq!(trace.events.len(), 1);
    }

    #[test]
    fn a_wrong_header_says_what_was_expected() {
        let error = parse("time,client,key\n").unwrap_err();
        assert!(matches!(error, TraceError::Header { .. }), "{error}");
        assert!(error.to_string().contains("ts_us,client,key,mode,hold_us"));
    }

    #[test]
    fn an_empty_file_is_an_error() {
        assert!(matches!(parse("").unwrap_err(), TraceError::Empty));
    }

    #[test]
    fn errors_carry_the_line_number() {
        let text = "ts_us,client,key,mode,hold_us\n0,0,a,X,5\n1,0,b,Q,5\n";
        let error = parse(text).unwrap_err();
        assert!(
            matches!(
                error,
                TraceError::Field {
                    line: 3,
                    field: "mode",
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().starts_with("trace line 3"));
    }

    #[test]
    fn each_field_is_checked() {
        let cases = [
            ("x,0,a,X,5", "ts_us"),
            ("0,-1,a,X,5", "client"),
            ("0,0,,X,5", "key"),
            ("0,0,a,X,0", "hold_us"),
            ("0,0,a,X,1.5", "hold_us"),
        ];
        for (row, field_expected) in cases {
            let error = parse(&format!("{HEADER}\n{row}\n")).unwrap_err();
            match error {
                TraceError::Field { line: 2, field, .. } => {
                    assert_eq!(field, field_expected, "{row}")
                }
                other => panic!("{row}: unexpected {other}"),
            }
        }
        let long_key = "k".repeat(65);
        assert!(matches!(
            parse(&format!("{HEADER}\n0,0,{long_key},X,1\n")).unwrap_err(),
            TraceError::Field { field: "key", .. }
        ));
    }

    #[test]
    fn a_row_with_too_many_fields_is_rejected() {
        let error = parse(&format!("{HEADER}\n0,0,a,X,5,9\n")).unwrap_err();
        assert!(
            matches!(error, TraceError::FieldCount { line: 2, found: 6 }),
            "{error}"
        );
    }

    #[test]
    fn unsorted_rows_are_rejected() {
        let error = parse(&format!("{HEADER}\n5,0,a,X,5\n4,0,a,X,5\n")).unwrap_err();
        assert!(
            matches!(
                error,
                TraceError::Unsorted {
                    line: 3,
                    ts_us: 4,
                    previous_ts_us: 5
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn gzip_files_are_detected_by_magic_bytes() {
        let directory =
            std::env::temp_dir().join(format!("forelock-trace-test-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("trace.csv"); // no .gz suffix on purpose
        let mut encoder = flate2::write::GzEncoder::new(
            File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        write!(encoder, "{HEADER}\n0,0,a,X,5\n7,2,b,S,9\n").unwrap();
        encoder.finish().unwrap();
        let trace = read_trace_file(&path).unwrap();
        assert_eq!(trace.events.len(), 2);
        assert_eq!(trace.events[1].client, 2);
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let error = read_trace_file(Path::new("/nonexistent/trace.csv.gz")).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/trace.csv.gz"));
    }
}
