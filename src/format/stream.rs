//! The send/receive stream: a volume's snapshots (whole, or what changed since an older one) as a
//! sequence of records, written to a pipe by `imgpool send` and applied by `imgpool recv`.
//!
//! ```text
//! stream  := MAGIC record* End
//! record  := kind u8 | seq u64 LE | len u32 LE | payload[len] | crc32c u32 LE
//! ```
//!
//! `seq` counts the records of the stream from 0 and the CRC32C covers kind, seq, len and
//! payload: a record that was changed, dropped, repeated or moved is refused before anything
//! of it is applied. The first record is the `Header` (JSON: the package); then, with
//! `--with-image`, the base image (`ImageData`…, `ImageEnd`); then each snapshot of the package
//! in order: `SnapshotBegin`, its `Data` and `Zero` records in ascending offsets, and
//! `SnapshotEnd` with the digest of the snapshot's whole content, which the receiver checks
//! before the snapshot appears. `End` closes a stream that ended correctly; anything after it
//! is refused.
//!
//! The content digest is incremental, so that an incremental stream proves the whole content
//! of its snapshot without anyone reading the whole volume: see `ContentHash`.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use super::volume::{BLOCK, GRANULE};

/// The stream's first bytes: what it is and the version of its format.
pub const MAGIC: &[u8; 8] = b"IMGPSTR1";

/// The largest payload a record may have: a `Data` record of 1 MiB and its offset.
pub const MAX_PAYLOAD: usize = (1 << 20) + 64;

/// The largest header: it lists the package's snapshots, about 150 bytes each, so a package of
/// a million snapshots fits (ZFS's `send -R` stops at 65,535).
pub const MAX_HEADER: usize = 256 << 20;

/// The most data one `Data` or `ImageData` record carries.
pub const MAX_DATA: usize = 1 << 20;

const KIND_HEADER: u8 = 1;
const KIND_IMAGE_DATA: u8 = 2;
const KIND_IMAGE_END: u8 = 3;
const KIND_SNAPSHOT_BEGIN: u8 = 4;
const KIND_DATA: u8 = 5;
const KIND_ZERO: u8 = 6;
const KIND_SNAPSHOT_END: u8 = 7;
const KIND_END: u8 = 8;

/// The image a volume reads where it never wrote, as the stream names it: the receiving pool
/// uses its own image with the same SHA-512.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamImage {
    pub name: String,
    pub uuid: String,
    /// Hex.
    pub sha512: String,
    pub size: u64,
}

/// One snapshot of the package, as it will be on the receiving side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSnapshot {
    pub name: String,
    pub guid: String,
    pub created: i64,
    pub size: u64,
    /// The receiver makes its volume equal to this snapshot but keeps no snapshot of it (the
    /// temporary snapshot of a refresh copy).
    #[serde(default)]
    pub temporary: bool,
}

/// Where a resumed stream starts: the package's first `done` snapshots were received whole,
/// and of the next one every granule before `granule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    pub done: usize,
    pub granule: u64,
}

/// The first record: what the stream carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Identifies the package across resumes.
    pub package: String,
    /// The sending volume's name and uuid.
    pub volume: String,
    pub volume_uuid: String,
    pub base_image: Option<StreamImage>,
    /// The snapshot (by guid) an incremental stream applies on top of; none for a whole one.
    pub from: Option<StreamSnapshot>,
    /// The snapshots, oldest first.
    pub snapshots: Vec<StreamSnapshot>,
    /// Every snapshot between `from` (or the volume's first) and the last is in the package
    /// (`send --from-all`), not only the last.
    pub from_all: bool,
    /// The base image's data follows the header.
    pub with_image: bool,
    /// Set in a stream that continues an interrupted one.
    pub resume: Option<ResumePoint>,
}

/// What `recv --resume-token` prints and `send --resume` takes: enough for the sender to make
/// the same package again and send what the receiver lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeToken {
    pub package: String,
    pub volume_uuid: String,
    /// The guid of the package's `from` snapshot, if incremental.
    pub from: Option<String>,
    /// The guid of the package's last snapshot.
    pub to: String,
    pub from_all: bool,
    /// The receiver still needs the base image.
    pub with_image: bool,
    /// `snapshots_digest` of the package's snapshots: the sender refuses to resume a package
    /// whose snapshots changed since (one deleted on the source, say).
    pub snapshots: String,
    pub point: ResumePoint,
}

const TOKEN_PREFIX: &str = "imgpool-resume-1-";

impl ResumeToken {
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a token serializes to JSON");
        format!("{TOKEN_PREFIX}{}", hex::encode(json))
    }

    pub fn decode(token: &str) -> Result<ResumeToken, String> {
        const BAD: &str = "this is not a resume token of `imgpool recv --resume-token` (copy it whole, on one line)";
        let hex = token.trim().strip_prefix(TOKEN_PREFIX).ok_or(BAD)?;
        let json = hex::decode(hex).map_err(|_| BAD)?;
        serde_json::from_slice(&json).map_err(|_| BAD.to_string())
    }
}

/// A short digest of a package's snapshots (their guids in order).
pub fn snapshots_digest(snapshots: &[StreamSnapshot]) -> String {
    let mut hasher = blake3::Hasher::new();
    for s in snapshots {
        hasher.update(s.guid.as_bytes());
        hasher.update(b"\n");
    }
    hex::encode(&hasher.finalize().as_bytes()[..16])
}

// One record is in hand at a time and one header per stream: boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Header(Header),
    /// Base image bytes at `offset` (`--with-image`); what no record covers reads as zeros.
    ImageData {
        offset: u64,
        data: Vec<u8>,
    },
    /// The base image is whole: its SHA-512.
    ImageEnd {
        sha512: [u8; 64],
    },
    /// The package's snapshot `index` follows; the volume has `size` bytes at it.
    SnapshotBegin {
        index: u32,
        size: u64,
    },
    /// Whole blocks of the snapshot's content at `offset` (both multiples of `BLOCK`).
    Data {
        offset: u64,
        data: Vec<u8>,
    },
    /// `len` bytes at `offset` read as zeros (multiples of `BLOCK`).
    Zero {
        offset: u64,
        len: u64,
    },
    /// The snapshot `index` is whole; `digest` is `ContentHash::digest` of its content.
    SnapshotEnd {
        index: u32,
        digest: [u8; 32],
    },
    End,
}

/// Why a stream is refused.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the input is not an imgpool stream (it does not start with the stream's magic; was it made by `imgpool send`?)")]
    NotAStream,
    #[error(
        "the stream ends early, in or before record {seq} (a connection cut or a truncated file)"
    )]
    Truncated { seq: u64 },
    #[error("record {seq} of the stream is corrupt (its CRC32C does not match: the stream was changed on the way)")]
    Corrupt { seq: u64 },
    #[error("record {found} of the stream came where record {expected} was due (records dropped, repeated or reordered)")]
    OutOfOrder { expected: u64, found: u64 },
    #[error("record {seq} of the stream is malformed: {why}")]
    Malformed { seq: u64, why: String },
    #[error("the stream goes on after its end record")]
    TrailingData,
    #[error("cannot read the stream: {0}")]
    Io(#[source] io::Error),
}

impl StreamError {
    fn malformed(seq: u64, why: impl Into<String>) -> StreamError {
        StreamError::Malformed {
            seq,
            why: why.into(),
        }
    }
}

impl Record {
    fn kind(&self) -> u8 {
        match self {
            Record::Header(_) => KIND_HEADER,
            Record::ImageData { .. } => KIND_IMAGE_DATA,
            Record::ImageEnd { .. } => KIND_IMAGE_END,
            Record::SnapshotBegin { .. } => KIND_SNAPSHOT_BEGIN,
            Record::Data { .. } => KIND_DATA,
            Record::Zero { .. } => KIND_ZERO,
            Record::SnapshotEnd { .. } => KIND_SNAPSHOT_END,
            Record::End => KIND_END,
        }
    }

    /// The payload in two parts, so that a data record's bytes are written from where they
    /// are, not copied behind their offset: its offset (empty for other kinds) and the rest.
    fn payload(&self) -> ([u8; 8], usize, std::borrow::Cow<'_, [u8]>) {
        let mut prefix = [0u8; 8];
        let body: Vec<u8> = match self {
            Record::Header(header) => {
                serde_json::to_vec(header).expect("a header serializes to JSON")
            }
            Record::ImageData { offset, data } | Record::Data { offset, data } => {
                prefix = offset.to_le_bytes();
                return (prefix, 8, std::borrow::Cow::Borrowed(data));
            }
            Record::ImageEnd { sha512 } => sha512.to_vec(),
            Record::SnapshotBegin { index, size } => {
                let mut p = index.to_le_bytes().to_vec();
                p.extend_from_slice(&size.to_le_bytes());
                p
            }
            Record::Zero { offset, len } => {
                let mut p = offset.to_le_bytes().to_vec();
                p.extend_from_slice(&len.to_le_bytes());
                p
            }
            Record::SnapshotEnd { index, digest } => {
                let mut p = index.to_le_bytes().to_vec();
                p.extend_from_slice(digest);
                p
            }
            Record::End => Vec::new(),
        };
        (prefix, 0, std::borrow::Cow::Owned(body))
    }

    /// `offset`: a data record's first 8 bytes, read apart from its data (`payload`).
    fn parse(
        seq: u64,
        kind: u8,
        offset: Option<u64>,
        payload: Vec<u8>,
    ) -> Result<Record, StreamError> {
        let fixed = |len: usize| -> Result<(), StreamError> {
            if payload.len() == len {
                Ok(())
            } else {
                Err(StreamError::malformed(
                    seq,
                    format!(
                        "a record of kind {kind} has {} bytes, not {len}",
                        payload.len()
                    ),
                ))
            }
        };
        let u64_at = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().unwrap());
        let u32_at = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().unwrap());
        let blocks = |offset: u64, len: u64| -> Result<(), StreamError> {
            if !offset.is_multiple_of(BLOCK) || !len.is_multiple_of(BLOCK) || len == 0 {
                return Err(StreamError::malformed(
                    seq,
                    format!("{len} bytes at {offset} are not whole blocks"),
                ));
            }
            offset
                .checked_add(len)
                .map(drop)
                .ok_or_else(|| StreamError::malformed(seq, "a range past 2^64"))
        };
        Ok(match kind {
            KIND_HEADER => Record::Header(
                serde_json::from_slice(&payload)
                    .map_err(|e| StreamError::malformed(seq, format!("its header: {e}")))?,
            ),
            KIND_IMAGE_DATA | KIND_DATA => {
                let Some(offset) = offset else {
                    return Err(StreamError::malformed(seq, "a data record without offset"));
                };
                let data = payload;
                if data.len() > MAX_DATA {
                    return Err(StreamError::malformed(seq, "a data record over 1 MiB"));
                }
                if kind == KIND_DATA {
                    blocks(offset, data.len() as u64)?;
                    Record::Data { offset, data }
                } else {
                    Record::ImageData { offset, data }
                }
            }
            KIND_IMAGE_END => {
                fixed(64)?;
                Record::ImageEnd {
                    sha512: payload.try_into().unwrap(),
                }
            }
            KIND_SNAPSHOT_BEGIN => {
                fixed(12)?;
                Record::SnapshotBegin {
                    index: u32_at(0),
                    size: u64_at(4),
                }
            }
            KIND_ZERO => {
                fixed(16)?;
                let (offset, len) = (u64_at(0), u64_at(8));
                blocks(offset, len)?;
                Record::Zero { offset, len }
            }
            KIND_SNAPSHOT_END => {
                fixed(36)?;
                Record::SnapshotEnd {
                    index: u32_at(0),
                    digest: payload[4..].try_into().unwrap(),
                }
            }
            KIND_END => {
                fixed(0)?;
                Record::End
            }
            other => {
                return Err(StreamError::malformed(
                    seq,
                    format!("unknown record kind {other}"),
                ))
            }
        })
    }
}

/// Writes records to a pipe or file, counting the bytes.
pub struct StreamWriter<W: Write> {
    out: W,
    seq: u64,
    bytes: u64,
}

impl<W: Write> StreamWriter<W> {
    /// Starts a stream: writes its magic.
    pub fn new(mut out: W) -> io::Result<StreamWriter<W>> {
        out.write_all(MAGIC)?;
        Ok(StreamWriter {
            out,
            seq: 0,
            bytes: MAGIC.len() as u64,
        })
    }

    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        let (prefix, prefix_len, body) = record.payload();
        let payload_len = prefix_len + body.len();
        let max = match record {
            Record::Header(_) => MAX_HEADER,
            _ => MAX_PAYLOAD,
        };
        if payload_len > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a stream record of {payload_len} bytes is over the limit of {max}"),
            ));
        }
        let mut head = [0u8; 13];
        head[0] = record.kind();
        head[1..9].copy_from_slice(&self.seq.to_le_bytes());
        head[9..13].copy_from_slice(&(payload_len as u32).to_le_bytes());
        let prefix = &prefix[..prefix_len];
        let crc =
            crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&head), prefix), &body);
        self.out.write_all(&head)?;
        self.out.write_all(prefix)?;
        self.out.write_all(&body)?;
        self.out.write_all(&crc.to_le_bytes())?;
        self.seq += 1;
        self.bytes += (head.len() + payload_len + 4) as u64;
        Ok(())
    }

    /// Bytes written so far, magic included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// The output, for tests that look at the bytes.
    #[cfg(test)]
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Reads records, each checked (CRC32C, sequence, shape) before it is returned.
pub struct StreamReader<R: Read> {
    input: R,
    seq: u64,
    bytes: u64,
    ended: bool,
    trailing_checked: bool,
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` at a clean end of input before the first byte.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match input.read(&mut buf[done..]) {
            Ok(0) if done == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

impl<R: Read> StreamReader<R> {
    /// Checks the stream's magic.
    pub fn new(mut input: R) -> Result<StreamReader<R>, StreamError> {
        let mut magic = [0u8; 8];
        match read_full(&mut input, &mut magic) {
            Ok(true) if &magic == MAGIC => {}
            Ok(false) => return Err(StreamError::Truncated { seq: 0 }),
            Ok(true) => return Err(StreamError::NotAStream),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(StreamError::NotAStream)
            }
            Err(e) => return Err(StreamError::Io(e)),
        }
        Ok(StreamReader {
            input,
            seq: 0,
            bytes: MAGIC.len() as u64,
            ended: false,
            trailing_checked: false,
        })
    }

    /// The next record. After `End`, checks that nothing follows and returns `End` again.
    pub fn next(&mut self) -> Result<Record, StreamError> {
        let seq = self.seq;
        let truncated = |e: io::Error| match e.kind() {
            io::ErrorKind::UnexpectedEof => StreamError::Truncated { seq },
            _ => StreamError::Io(e),
        };
        if self.ended {
            self.trailing_checked = true;
            let mut byte = [0u8; 1];
            return match read_full(&mut self.input, &mut byte).map_err(StreamError::Io)? {
                true => Err(StreamError::TrailingData),
                false => Ok(Record::End),
            };
        }
        let mut head = [0u8; 13];
        if !read_full(&mut self.input, &mut head).map_err(truncated)? {
            return Err(StreamError::Truncated { seq });
        }
        let kind = head[0];
        let len = u32::from_le_bytes(head[9..13].try_into().unwrap()) as usize;
        let max = if kind == KIND_HEADER {
            MAX_HEADER
        } else {
            MAX_PAYLOAD
        };
        if len > max {
            // A length this large is damage, not a record: do not allocate it.
            return Err(StreamError::Corrupt { seq });
        }
        // A data record's offset is read apart, so that its data lands in a buffer of its own
        // and is handed on as it is, never copied.
        let mut prefix = [0u8; 8];
        let prefix_len = if matches!(kind, KIND_DATA | KIND_IMAGE_DATA) && len >= 8 {
            8
        } else {
            0
        };
        if !read_full(&mut self.input, &mut prefix[..prefix_len]).map_err(truncated)? {
            return Err(StreamError::Truncated { seq });
        }
        // Read into spare capacity, not a zero-filled buffer: zeroing each payload first was
        // a tenth of the reading thread's time.
        let payload_len = len - prefix_len;
        let mut payload = Vec::with_capacity(payload_len);
        (&mut self.input)
            .take(payload_len as u64)
            .read_to_end(&mut payload)
            .map_err(truncated)?;
        if payload.len() != payload_len {
            return Err(StreamError::Truncated { seq });
        }
        let mut crc = [0u8; 4];
        if !read_full(&mut self.input, &mut crc).map_err(truncated)? {
            return Err(StreamError::Truncated { seq });
        }
        let expected = crc32c::crc32c_append(
            crc32c::crc32c_append(crc32c::crc32c(&head), &prefix[..prefix_len]),
            &payload,
        );
        if u32::from_le_bytes(crc) != expected {
            return Err(StreamError::Corrupt { seq });
        }
        let found = u64::from_le_bytes(head[1..9].try_into().unwrap());
        if found != seq {
            return Err(StreamError::OutOfOrder {
                expected: seq,
                found,
            });
        }
        self.seq += 1;
        self.bytes += (head.len() + len + 4) as u64;
        let offset = (prefix_len == 8).then(|| u64::from_le_bytes(prefix));
        let record = Record::parse(seq, kind, offset, payload)?;
        if record == Record::End {
            self.ended = true;
        }
        Ok(record)
    }

    /// Bytes read so far, magic included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether the end record was read and, after it, the check that nothing follows.
    fn ended_checked(&self) -> bool {
        self.trailing_checked
    }
}

/// Where a receive takes its records from: a `StreamReader`, or one running ahead in a thread.
pub trait Records {
    /// The next record, checked (see `StreamReader::next`).
    fn next(&mut self) -> Result<Record, StreamError>;
    /// Stream bytes read so far, up to the last record returned.
    fn bytes(&self) -> u64;
}

impl<R: Read> Records for StreamReader<R> {
    fn next(&mut self) -> Result<Record, StreamError> {
        StreamReader::next(self)
    }

    fn bytes(&self) -> u64 {
        StreamReader::bytes(self)
    }
}

/// Records read and checked by a thread of their own, up to `READ_AHEAD` records ahead: the
/// pipe's copy into this process, the CRC and the buffers' setup overlap the receive's work
/// (they were a quarter of a receive's time). The thread stops after the end (and the check
/// that nothing follows it), at the first error, or when this side is dropped; a thread still
/// waiting for input then goes with the process.
pub struct ReadAhead {
    records: std::sync::mpsc::Receiver<(Result<Record, StreamError>, u64)>,
    bytes: u64,
    ended: bool,
}

/// Records in flight between the reading thread and the receive: at most 32 MiB of data.
const READ_AHEAD: usize = 32;

impl ReadAhead {
    pub fn start<R: Read + Send + 'static>(mut reader: StreamReader<R>) -> io::Result<ReadAhead> {
        let (send, records) = std::sync::mpsc::sync_channel(READ_AHEAD);
        std::thread::Builder::new()
            .name("stream-read".into())
            .spawn(move || loop {
                let record = reader.next();
                let stop = match &record {
                    Ok(Record::End) => reader.ended_checked(),
                    Ok(_) => false,
                    Err(_) => true,
                };
                if send.send((record, reader.bytes())).is_err() || stop {
                    return;
                }
            })?;
        Ok(ReadAhead {
            records,
            bytes: 0,
            ended: false,
        })
    }
}

impl Records for ReadAhead {
    fn next(&mut self) -> Result<Record, StreamError> {
        match self.records.recv() {
            Ok((record, bytes)) => {
                self.bytes = bytes;
                self.ended |= matches!(record, Ok(Record::End));
                record
            }
            // The thread stops only after the end was checked or an error was handed on.
            Err(_) if self.ended => Ok(Record::End),
            Err(_) => Err(StreamError::Io(io::Error::other(
                "the thread reading the stream stopped",
            ))),
        }
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The content of a volume at a snapshot, as one digest that can be brought up to date from
/// what changed alone.
///
/// Each granule `g` contributes `H(g, B(its bytes)) - H(g, B(the base image's bytes there))`,
/// where `B` is BLAKE3 and `H` 64 bytes of BLAKE3's output taken as eight 64-bit lanes, added
/// with wrap-around (`granule_hash`). So a granule that
/// reads as the base contributes nothing and the sum covers the whole content while only the
/// granules the volume changed are ever hashed. Between two snapshots the sum changes by
/// `H(g, new) - H(g, old)` for each granule that changed. Bytes past the volume's size count
/// as zeros, so that a granule's hash does not depend on where the volume ends.
///
/// This detects damage and mistakes (a wrong base, a lost or misapplied record), not an
/// adversary who chooses the data: sums of hashes admit crafted collisions. The transport's
/// authenticity is ssh's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContentHash {
    lanes: [u64; 8],
}

/// The hash of one granule's 64 KiB at index `granule`: its position bound to the BLAKE3 of
/// its bytes, so that the bytes are hashed once whatever the position, and a granule of zeros
/// (what most of a new volume's granules were before it was written) is not hashed at all.
pub fn granule_hash(granule: u64, bytes: &[u8]) -> [u64; 8] {
    debug_assert_eq!(bytes.len() as u64, GRANULE);
    static ZEROS: [u8; GRANULE as usize] = [0; GRANULE as usize];
    static ZEROS_HASH: std::sync::OnceLock<blake3::Hash> = std::sync::OnceLock::new();
    // One memcmp, which stops at the first byte of data.
    let content = if bytes == &ZEROS[..] {
        *ZEROS_HASH.get_or_init(|| blake3::hash(&ZEROS))
    } else {
        blake3::hash(bytes)
    };
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"imgpool granule v1");
    hasher.update(&granule.to_le_bytes());
    hasher.update(content.as_bytes());
    let mut out = [0u8; 64];
    hasher.finalize_xof().fill(&mut out);
    let mut lanes = [0u64; 8];
    for (lane, word) in lanes.iter_mut().zip(out.chunks_exact(8)) {
        *lane = u64::from_le_bytes(word.try_into().unwrap());
    }
    lanes
}

impl ContentHash {
    /// Granule `granule` went from `old` to `new` (64 KiB each; for a whole stream, `old` is
    /// the base image's bytes).
    pub fn change(&mut self, granule: u64, old: &[u8], new: &[u8]) {
        if old == new {
            return;
        }
        self.add_lanes(granule_hash(granule, new), granule_hash(granule, old));
    }

    /// Adds the hash `plus` and takes away the hash `minus` (each from `granule_hash`).
    pub fn add_lanes(&mut self, plus: [u64; 8], minus: [u64; 8]) {
        for ((lane, p), m) in self.lanes.iter_mut().zip(plus).zip(minus) {
            *lane = lane.wrapping_add(p).wrapping_sub(m);
        }
    }

    pub fn to_bytes(self) -> [u8; 64] {
        let mut out = [0u8; 64];
        for (word, lane) in out.chunks_exact_mut(8).zip(self.lanes) {
            word.copy_from_slice(&lane.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(bytes: &[u8; 64]) -> ContentHash {
        let mut lanes = [0u64; 8];
        for (lane, word) in lanes.iter_mut().zip(bytes.chunks_exact(8)) {
            *lane = u64::from_le_bytes(word.try_into().unwrap());
        }
        ContentHash { lanes }
    }

    /// The snapshot's digest: the sum with the volume's size and its base image (by SHA-512,
    /// hex; none for a volume over zeros).
    pub fn digest(&self, size: u64, base_sha512: Option<&str>) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"imgpool snapshot v1");
        hasher.update(&size.to_le_bytes());
        hasher.update(base_sha512.unwrap_or("").as_bytes());
        hasher.update(&[0]);
        hasher.update(&self.to_bytes());
        *hasher.finalize().as_bytes()
    }
}

/// A stream followed as its bytes pass by (`imgpool copy` relays it), for its progress only:
/// how many snapshots the header lists and how many have begun. It checks nothing: the
/// receiver does, record by record.
#[derive(Debug, Default)]
pub struct StreamProgress {
    /// The magic or the current record's head, as far as it has passed.
    head: Vec<u8>,
    magic_passed: bool,
    kind: u8,
    /// Bytes of the current record's payload and CRC still to pass.
    left: u64,
    /// The header record's payload and CRC, as far as they have passed.
    header: Vec<u8>,
    /// The snapshots the header lists (0 until it has passed).
    pub snapshots: usize,
    /// The snapshots begun so far.
    pub begun: usize,
}

impl StreamProgress {
    pub fn feed(&mut self, mut bytes: &[u8]) {
        const HEAD: usize = 13;
        while !bytes.is_empty() {
            if !self.magic_passed || self.left == 0 {
                let want = if self.magic_passed { HEAD } else { MAGIC.len() };
                let take = (want - self.head.len()).min(bytes.len());
                self.head.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.head.len() < want {
                    continue;
                }
                if self.magic_passed {
                    self.kind = self.head[0];
                    let len = u32::from_le_bytes(self.head[9..HEAD].try_into().expect("4 bytes"));
                    self.left = u64::from(len) + 4;
                    self.begun += usize::from(self.kind == KIND_SNAPSHOT_BEGIN);
                }
                self.magic_passed = true;
                self.head.clear();
                continue;
            }
            let take = self.left.min(bytes.len() as u64) as usize;
            if self.kind == KIND_HEADER {
                self.header.extend_from_slice(&bytes[..take]);
            }
            self.left -= take as u64;
            bytes = &bytes[take..];
            if self.left == 0 && self.kind == KIND_HEADER {
                let payload = &self.header[..self.header.len() - 4];
                if let Ok(header) = serde_json::from_slice::<Header>(payload) {
                    self.snapshots = header.snapshots.len();
                }
                self.header = Vec::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            package: "p".into(),
            volume: "v".into(),
            volume_uuid: "u".into(),
            base_image: None,
            from: None,
            snapshots: vec![StreamSnapshot {
                name: "s".into(),
                guid: "g".into(),
                created: 1,
                size: 1 << 20,
                temporary: false,
            }],
            from_all: false,
            with_image: false,
            resume: None,
        }
    }

    #[test]
    fn a_resume_token_reads_back_and_garbage_is_refused() {
        let token = ResumeToken {
            package: "p".into(),
            volume_uuid: "u".into(),
            from: Some("a".into()),
            to: "b".into(),
            from_all: true,
            with_image: false,
            snapshots: snapshots_digest(&header().snapshots),
            point: ResumePoint {
                done: 1,
                granule: 42,
            },
        };
        assert_eq!(ResumeToken::decode(&token.encode()).unwrap(), token);
        assert!(ResumeToken::decode("imgpool-resume-1-zz").is_err());
        assert!(ResumeToken::decode("something").is_err());
    }

    fn sample() -> Vec<Record> {
        vec![
            Record::Header(header()),
            Record::ImageData {
                offset: 3,
                data: vec![7; 10],
            },
            Record::ImageEnd { sha512: [9; 64] },
            Record::SnapshotBegin {
                index: 0,
                size: 1 << 20,
            },
            Record::Data {
                offset: 4096,
                data: vec![1; 8192],
            },
            Record::Zero {
                offset: 65536,
                len: 4096,
            },
            Record::SnapshotEnd {
                index: 0,
                digest: [5; 32],
            },
            Record::End,
        ]
    }

    fn encode(records: &[Record]) -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        for r in records {
            w.write(r).unwrap();
        }
        assert_eq!(w.bytes(), w.out.len() as u64);
        w.out
    }

    fn decode(bytes: &[u8]) -> Result<Vec<Record>, StreamError> {
        let mut r = StreamReader::new(bytes)?;
        let mut out = Vec::new();
        loop {
            let record = r.next()?;
            let end = record == Record::End;
            out.push(record);
            if end {
                r.next()?;
                return Ok(out);
            }
        }
    }

    #[test]
    fn records_read_back_as_written() {
        let records = sample();
        assert_eq!(decode(&encode(&records)).unwrap(), records);
    }

    #[test]
    fn every_flipped_byte_and_every_cut_is_refused() {
        let bytes = encode(&sample());
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x20;
            assert!(decode(&damaged).is_err(), "a flip at byte {at} went unseen");
            assert!(
                matches!(
                    decode(&bytes[..at]),
                    Err(StreamError::Truncated { .. }) | Err(StreamError::NotAStream)
                ),
                "a cut at byte {at} went unseen"
            );
        }
    }

    #[test]
    fn dropped_repeated_and_reordered_records_are_refused() {
        let records = sample();
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        let mut spans = Vec::new();
        for r in &records {
            let start = w.bytes() as usize;
            w.write(r).unwrap();
            spans.push(start..w.bytes() as usize);
        }
        let whole = w.out;
        let piece = |i: usize| whole[spans[i].clone()].to_vec();
        let assemble = |order: &[usize]| {
            let mut s = MAGIC.to_vec();
            for &i in order {
                s.extend(piece(i));
            }
            s
        };
        for order in [
            vec![0, 1, 2, 3, 5, 4, 6, 7],
            vec![0, 1, 2, 3, 4, 4, 5, 6, 7],
            vec![0, 1, 2, 3, 5, 6, 7],
        ] {
            assert!(
                matches!(
                    decode(&assemble(&order)),
                    Err(StreamError::OutOfOrder { .. })
                ),
                "{order:?} went unseen"
            );
        }
        let mut trailing = whole.clone();
        trailing.push(0);
        assert!(matches!(decode(&trailing), Err(StreamError::TrailingData)));
    }

    #[test]
    fn a_header_of_a_million_snapshots_fits() {
        let mut big = header();
        big.snapshots = (0..1_000_000)
            .map(|i| StreamSnapshot {
                name: format!("daily-2026-11-30T00:00:00-{i:07}"),
                guid: "7f0c5a2e-8a8b-4d0e-9d55-2a6f1f3c9b10".into(),
                created: 1_790_000_000 + i,
                size: 1 << 40,
                temporary: false,
            })
            .collect();
        let records = vec![Record::Header(big), Record::End];
        assert_eq!(decode(&encode(&records)).unwrap(), records);
    }

    #[test]
    fn something_else_is_not_a_stream() {
        assert!(matches!(
            decode(b"QFI\xfb\0\0\0\x03 and more"),
            Err(StreamError::NotAStream)
        ));
    }

    #[test]
    fn the_content_hash_follows_changes_in_any_order_and_undoes_them() {
        let g = GRANULE as usize;
        let base = vec![0u8; g];
        let a = vec![1u8; g];
        let b = vec![2u8; g];
        let mut one = ContentHash::default();
        one.change(0, &base, &a);
        one.change(5, &base, &b);
        let mut other = ContentHash::default();
        other.change(5, &base, &b);
        other.change(0, &base, &a);
        assert_eq!(one, other);
        // Through an intermediate state: the same sum as straight to the end.
        let mut via = ContentHash::default();
        via.change(0, &base, &b);
        via.change(0, &b, &a);
        via.change(5, &base, &b);
        assert_eq!(via, one);
        // The same bytes at another granule are other content.
        let mut moved = ContentHash::default();
        moved.change(1, &base, &a);
        moved.change(5, &base, &b);
        assert_ne!(moved, one);
        // Back to the base: nothing left.
        one.change(0, &a, &base);
        one.change(5, &b, &base);
        assert_eq!(one, ContentHash::default());
        assert_eq!(
            ContentHash::from_bytes(&via.to_bytes()),
            via,
            "the sum stores and loads"
        );
        assert_ne!(via.digest(1 << 20, None), via.digest(2 << 20, None));
        assert_ne!(via.digest(1 << 20, None), via.digest(1 << 20, Some("ab")));
    }

    #[test]
    fn progress_follows_a_stream_fed_in_pieces_of_any_size() {
        let mut header = header();
        header.snapshots.push(StreamSnapshot {
            name: "t".into(),
            ..header.snapshots[0].clone()
        });
        let mut writer = StreamWriter::new(Vec::new()).unwrap();
        writer.write(&Record::Header(header)).unwrap();
        for index in 0..2 {
            writer
                .write(&Record::SnapshotBegin {
                    index,
                    size: 1 << 20,
                })
                .unwrap();
            writer
                .write(&Record::Data {
                    offset: 0,
                    // Bytes that look like record heads of another kind.
                    data: vec![KIND_SNAPSHOT_BEGIN; 8192],
                })
                .unwrap();
            writer
                .write(&Record::SnapshotEnd {
                    index,
                    digest: [0; 32],
                })
                .unwrap();
        }
        writer.write(&Record::End).unwrap();
        let stream = writer.into_inner();
        for piece in [1, 3, 13, 17, 4096, stream.len()] {
            let mut progress = StreamProgress::default();
            let mut begun = Vec::new();
            for chunk in stream.chunks(piece) {
                progress.feed(chunk);
                begun.push(progress.begun);
            }
            assert_eq!(
                (progress.snapshots, progress.begun),
                (2, 2),
                "pieces of {piece}"
            );
            assert!(begun.windows(2).all(|w| w[0] <= w[1]));
        }
        let mut cut = StreamProgress::default();
        cut.feed(&stream[..40]);
        assert_eq!((cut.snapshots, cut.begun), (0, 0), "a header not yet whole");
    }
}
