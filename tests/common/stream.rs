//! An encoder of the send/receive stream of its own, written from the format as documented
//! (docs/send-receive.md, `format::stream`): tests feed `imgpool recv` with it, so that the
//! receiver is checked against the documented format rather than against the code that reads
//! it. Volumes over no base image only (zeros where never written).

use serde_json::Value;

pub const GRANULE: usize = 64 * 1024;

/// Record kinds.
pub const HEADER: u8 = 1;
pub const SNAPSHOT_BEGIN: u8 = 4;
pub const DATA: u8 = 5;
pub const SNAPSHOT_END: u8 = 7;
pub const END: u8 = 8;

/// A stream being written: magic, then records with their sequence and CRC32C.
pub struct StreamBuilder {
    bytes: Vec<u8>,
    seq: u64,
}

impl Default for StreamBuilder {
    fn default() -> Self {
        StreamBuilder {
            bytes: b"IMGPSTR1".to_vec(),
            seq: 0,
        }
    }
}

impl StreamBuilder {
    pub fn record(&mut self, kind: u8, payload: &[u8]) {
        let mut head = vec![kind];
        head.extend_from_slice(&self.seq.to_le_bytes());
        head.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head), payload);
        self.bytes.extend_from_slice(&head);
        self.bytes.extend_from_slice(payload);
        self.bytes.extend_from_slice(&crc.to_le_bytes());
        self.seq += 1;
    }

    pub fn header(&mut self, header: &Value) {
        self.record(HEADER, &serde_json::to_vec(header).unwrap());
    }

    pub fn begin(&mut self, index: u32, size: u64) {
        let mut payload = index.to_le_bytes().to_vec();
        payload.extend_from_slice(&size.to_le_bytes());
        self.record(SNAPSHOT_BEGIN, &payload);
    }

    pub fn data(&mut self, offset: u64, data: &[u8]) {
        let mut payload = offset.to_le_bytes().to_vec();
        payload.extend_from_slice(data);
        self.record(DATA, &payload);
    }

    pub fn end_snapshot(&mut self, index: u32, digest: &[u8; 32]) {
        let mut payload = index.to_le_bytes().to_vec();
        payload.extend_from_slice(digest);
        self.record(SNAPSHOT_END, &payload);
    }

    pub fn end(mut self) -> Vec<u8> {
        self.record(END, &[]);
        self.bytes
    }
}

fn granule_hash(granule: usize, bytes: &[u8]) -> [u64; 8] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"imgpool granule v1");
    hasher.update(&(granule as u64).to_le_bytes());
    hasher.update(blake3::hash(bytes).as_bytes());
    let mut out = [0u8; 64];
    hasher.finalize_xof().fill(&mut out);
    let mut lanes = [0u64; 8];
    for (lane, word) in lanes.iter_mut().zip(out.chunks_exact(8)) {
        *lane = u64::from_le_bytes(word.try_into().unwrap());
    }
    lanes
}

/// The digest of a volume's whole content (its size: `content.len()`) over no base image.
pub fn digest(content: &[u8]) -> [u8; 32] {
    let zeros = vec![0u8; GRANULE];
    let mut sum = [0u64; 8];
    for (g, bytes) in content.chunks(GRANULE).enumerate() {
        let mut padded = bytes.to_vec();
        padded.resize(GRANULE, 0);
        if padded != zeros {
            let (plus, minus) = (granule_hash(g, &padded), granule_hash(g, &zeros));
            for ((s, p), m) in sum.iter_mut().zip(plus).zip(minus) {
                *s = s.wrapping_add(p).wrapping_sub(m);
            }
        }
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"imgpool snapshot v1");
    hasher.update(&(content.len() as u64).to_le_bytes());
    hasher.update(&[0]);
    for lane in sum {
        hasher.update(&lane.to_le_bytes());
    }
    *hasher.finalize().as_bytes()
}
