//! HPACK, HTTP/2's header compression (RFC 7541), for the proxy's own
//! HTTP/2 codec: a header block is decoded in place, each field handed to
//! the caller as two byte slices (borrowed from the block, the tables or one
//! reused scratch buffer), and fields are encoded straight into the output
//! buffer. No allocation per field once the buffers have grown; no header
//! map built.
//!
//! The decoder takes whatever a conforming encoder may send and refuses the
//! rest with an [`HpackError`], which HTTP/2 answers with a connection error
//! (`COMPRESSION_ERROR`): indexes outside the tables, integers longer than
//! four continuation bytes, strings longer than the block, Huffman strings
//! that contain EOS or end in padding that is not a prefix of EOS of at
//! most seven bits, dynamic table size updates above the limit or after the
//! first field. Limits on the decoded header list (its size and number of
//! fields) are the caller's: a block must be decoded whole to keep the
//! table in step with the peer's even when its request is refused.
//!
//! The encoder uses no Huffman coding and does not search the dynamic
//! table: a field the static table holds whole goes as its index; any
//! other is compared with the field at the same place in the last block of
//! its kind (request, response head, trailers), and one that was there the
//! time before too is inserted and from then on sent as its index, which
//! costs a comparison instead of a copy. Anything else goes as a literal
//! (its name by index when the static table has it), `set-cookie`,
//! `authorization`, `proxy-authorization` and short cookies never indexed
//! (RFC 7541 §7.1.3). The encoder keeps the sizes of what it inserted, to
//! evict as the peer's decoder does, and the fields of the last block of
//! each kind. Between a proxy and its neighbours bytes are cheap and
//! instructions are not: a search of the table and Huffman coding of what
//! it misses cost about 300 instructions per field.
//!
//! The Huffman code is the one of RFC 7541 Appendix B; the decoder walks it
//! four bits at a time through a table of 256 states × 16 steps built at
//! compile time from the code itself.

use std::collections::VecDeque;

/// The dynamic table size both sides start with (`SETTINGS_HEADER_TABLE_SIZE`'s default).
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// What makes a header block undecodable (an HTTP/2 `COMPRESSION_ERROR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("header block ends inside a field")]
    Truncated,
    #[error("integer longer than four continuation bytes")]
    IntegerOverflow,
    #[error("index {0} is in neither table")]
    BadIndex(usize),
    #[error("invalid Huffman string")]
    Huffman,
    #[error("dynamic table size update to {0}, above the limit")]
    TableSize(usize),
    #[error("dynamic table size update after a header field")]
    LateSizeUpdate,
}

/// One decoded header field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: &'a [u8],
    pub value: &'a [u8],
    /// Sent as "never indexed": an intermediary passes it on the same way.
    pub never_indexed: bool,
}

/// The static table (RFC 7541 Appendix A); index `i` is `STATIC[i - 1]`.
const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// The static entries named `name`: the first index and how many.
///
/// By length first: a match on byte strings alone compares them one by
/// one, and most names a proxy sends match no arm.
fn static_name(name: &[u8]) -> Option<(usize, usize)> {
    let found = match name.len() {
        3 => match name {
            b"age" => (21, 1),
            b"via" => (60, 1),
            _ => return None,
        },
        4 => match name {
            b"date" => (33, 1),
            b"etag" => (34, 1),
            b"from" => (37, 1),
            b"host" => (38, 1),
            b"link" => (45, 1),
            b"vary" => (59, 1),
            _ => return None,
        },
        5 => match name {
            b":path" => (4, 2),
            b"allow" => (22, 1),
            b"range" => (50, 1),
            _ => return None,
        },
        6 => match name {
            b"accept" => (19, 1),
            b"cookie" => (32, 1),
            b"expect" => (35, 1),
            b"server" => (54, 1),
            _ => return None,
        },
        7 => match name {
            b":method" => (2, 2),
            b":scheme" => (6, 2),
            b":status" => (8, 7),
            b"expires" => (36, 1),
            b"referer" => (51, 1),
            b"refresh" => (52, 1),
            _ => return None,
        },
        8 => match name {
            b"if-match" => (39, 1),
            b"if-range" => (42, 1),
            b"location" => (46, 1),
            _ => return None,
        },
        10 => match name {
            b":authority" => (1, 1),
            b"set-cookie" => (55, 1),
            b"user-agent" => (58, 1),
            _ => return None,
        },
        11 => match name {
            b"retry-after" => (53, 1),
            _ => return None,
        },
        12 => match name {
            b"content-type" => (31, 1),
            b"max-forwards" => (47, 1),
            _ => return None,
        },
        13 => match name {
            b"accept-ranges" => (18, 1),
            b"authorization" => (23, 1),
            b"cache-control" => (24, 1),
            b"content-range" => (30, 1),
            b"if-none-match" => (41, 1),
            b"last-modified" => (44, 1),
            _ => return None,
        },
        14 => match name {
            b"accept-charset" => (15, 1),
            b"content-length" => (28, 1),
            _ => return None,
        },
        15 => match name {
            b"accept-encoding" => (16, 1),
            b"accept-language" => (17, 1),
            _ => return None,
        },
        16 => match name {
            b"content-encoding" => (26, 1),
            b"content-language" => (27, 1),
            b"content-location" => (29, 1),
            b"www-authenticate" => (61, 1),
            _ => return None,
        },
        17 => match name {
            b"if-modified-since" => (40, 1),
            b"transfer-encoding" => (57, 1),
            _ => return None,
        },
        18 => match name {
            b"proxy-authenticate" => (48, 1),
            _ => return None,
        },
        19 => match name {
            b"content-disposition" => (25, 1),
            b"if-unmodified-since" => (43, 1),
            b"proxy-authorization" => (49, 1),
            _ => return None,
        },
        25 => match name {
            b"strict-transport-security" => (56, 1),
            _ => return None,
        },
        27 => match name {
            b"access-control-allow-origin" => (20, 1),
            _ => return None,
        },
        _ => return None,
    };
    Some(found)
}

// ---- Huffman code (RFC 7541 Appendix B) ----

/// Each byte's code, right-aligned, and its length in bits.
const CODES: [u32; 256] = [
    0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5, 0xfffffe6, 0xfffffe7, 0xfffffe8, 0xffffea,
    0x3ffffffc, 0xfffffe9, 0xfffffea, 0x3ffffffd, 0xfffffeb, 0xfffffec, 0xfffffed, 0xfffffee, 0xfffffef, 0xffffff0,
    0xffffff1, 0xffffff2, 0x3ffffffe, 0xffffff3, 0xffffff4, 0xffffff5, 0xffffff6, 0xffffff7, 0xffffff8, 0xffffff9,
    0xffffffa, 0xffffffb, 0x14, 0x3f8, 0x3f9, 0xffa, 0x1ff9, 0x15, 0xf8, 0x7fa, 0x3fa, 0x3fb, 0xf9, 0x7fb, 0xfa, 0x16,
    0x17, 0x18, 0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x5c, 0xfb, 0x7ffc, 0x20, 0xffb, 0x3fc,
    0x1ffa, 0x21, 0x5d, 0x5e, 0x5f, 0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d,
    0x6e, 0x6f, 0x70, 0x71, 0x72, 0xfc, 0x73, 0xfd, 0x1ffb, 0x7fff0, 0x1ffc, 0x3ffc, 0x22, 0x7ffd, 0x3, 0x23, 0x4,
    0x24, 0x5, 0x25, 0x26, 0x27, 0x6, 0x74, 0x75, 0x28, 0x29, 0x2a, 0x7, 0x2b, 0x76, 0x2c, 0x8, 0x9, 0x2d, 0x77, 0x78,
    0x79, 0x7a, 0x7b, 0x7ffe, 0x7fc, 0x3ffd, 0x1ffd, 0xffffffc, 0xfffe6, 0x3fffd2, 0xfffe7, 0xfffe8, 0x3fffd3,
    0x3fffd4, 0x3fffd5, 0x7fffd9, 0x3fffd6, 0x7fffda, 0x7fffdb, 0x7fffdc, 0x7fffdd, 0x7fffde, 0xffffeb, 0x7fffdf,
    0xffffec, 0xffffed, 0x3fffd7, 0x7fffe0, 0xffffee, 0x7fffe1, 0x7fffe2, 0x7fffe3, 0x7fffe4, 0x1fffdc, 0x3fffd8,
    0x7fffe5, 0x3fffd9, 0x7fffe6, 0x7fffe7, 0xffffef, 0x3fffda, 0x1fffdd, 0xfffe9, 0x3fffdb, 0x3fffdc, 0x7fffe8,
    0x7fffe9, 0x1fffde, 0x7fffea, 0x3fffdd, 0x3fffde, 0xfffff0, 0x1fffdf, 0x3fffdf, 0x7fffeb, 0x7fffec, 0x1fffe0,
    0x1fffe1, 0x3fffe0, 0x1fffe2, 0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef, 0xfffea, 0x3fffe2, 0x3fffe3, 0x3fffe4,
    0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1, 0x3ffffe0, 0x3ffffe1, 0xfffeb, 0x7fff1, 0x3fffe7, 0x7ffff2, 0x3fffe8,
    0x1ffffec, 0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde, 0x7ffffdf, 0x3ffffe5, 0xfffff1, 0x1ffffed, 0x7fff2,
    0x1fffe3, 0x3ffffe6, 0x7ffffe0, 0x7ffffe1, 0x3ffffe7, 0x7ffffe2, 0xfffff2, 0x1fffe4, 0x1fffe5, 0x3ffffe8,
    0x3ffffe9, 0xffffffd, 0x7ffffe3, 0x7ffffe4, 0x7ffffe5, 0xfffec, 0xfffff3, 0xfffed, 0x1fffe6, 0x3fffe9, 0x1fffe7,
    0x1fffe8, 0x7ffff3, 0x3fffea, 0x3fffeb, 0x1ffffee, 0x1ffffef, 0xfffff4, 0xfffff5, 0x3ffffea, 0x7ffff4, 0x3ffffeb,
    0x7ffffe6, 0x3ffffec, 0x3ffffed, 0x7ffffe7, 0x7ffffe8, 0x7ffffe9, 0x7ffffea, 0x7ffffeb, 0xffffffe, 0x7ffffec,
    0x7ffffed, 0x7ffffee, 0x7ffffef, 0x7fffff0, 0x3ffffee,
];

const LENGTHS: [u8; 256] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28,
    28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12,
    10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6,
    5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22,
    22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22, 21, 20,
    22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28,
    27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28,
    27, 27, 27, 27, 27, 26,
];

/// The end-of-string symbol: thirty ones, never sent whole.
const EOS: (u32, u8) = (0x3fff_ffff, 30);

/// One step of the decoder: four bits read from state `s` lead to `next`,
/// having completed the symbol `sym` when `EMIT` is set.
#[derive(Clone, Copy)]
struct Step {
    next: u8,
    flags: u8,
    sym: u8,
}

const EMIT: u8 = 1;
/// The bits read include the EOS code: the string is invalid.
const FAIL: u8 = 2;
/// The string may end here: the bits read since the last symbol are at most
/// seven ones, a prefix of EOS.
const ACCEPT: u8 = 4;

const EMPTY: u16 = u16::MAX;
const LEAF: u16 = 0x8000;

/// The code's tree (256 inner nodes for 257 symbols, the root first) walked
/// four bits at a time from every inner node.
const fn decode_table() -> [[Step; 16]; 256] {
    let mut child = [[EMPTY; 2]; 256];
    let mut depth = [0u8; 256];
    let mut ones = [true; 256];
    let mut nodes = 1;
    let mut sym = 0;
    while sym < 257 {
        let (code, len) = if sym == 256 { EOS } else { (CODES[sym], LENGTHS[sym]) };
        let mut node = 0;
        let mut i = len;
        while i > 1 {
            i -= 1;
            let bit = ((code >> i) & 1) as usize;
            if child[node][bit] == EMPTY {
                child[node][bit] = nodes as u16;
                depth[nodes] = depth[node] + 1;
                ones[nodes] = ones[node] && bit == 1;
                nodes += 1;
            }
            node = child[node][bit] as usize;
        }
        child[node][(code & 1) as usize] = LEAF | sym as u16;
        sym += 1;
    }
    assert!(nodes == 256, "the Huffman code is not complete");
    let mut table = [[Step { next: 0, flags: 0, sym: 0 }; 16]; 256];
    let mut state = 0;
    while state < 256 {
        let mut nibble = 0;
        while nibble < 16 {
            let mut node = state;
            let mut flags = 0;
            let mut out = 0u8;
            let mut k = 4;
            while k > 0 {
                k -= 1;
                let c = child[node][(nibble >> k) & 1];
                assert!(c != EMPTY, "the Huffman code is not complete");
                if c & LEAF == 0 {
                    node = c as usize;
                } else if c & !LEAF == 256 {
                    flags |= FAIL;
                    break;
                } else {
                    flags |= EMIT;
                    out = (c & 0xff) as u8;
                    node = 0;
                }
            }
            if node == 0 || (ones[node] && depth[node] <= 7) {
                flags |= ACCEPT;
            }
            table[state][nibble] = Step { next: node as u8, flags, sym: out };
            nibble += 1;
        }
        state += 1;
    }
    table
}

static DECODE: [[Step; 16]; 256] = decode_table();

/// Appends the Huffman-decoded `src` to `out`.
fn huffman_decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    // Codes are at least five bits long.
    out.reserve(src.len() * 8 / 5 + 1);
    let mut state = 0usize;
    let mut accept = true;
    for &byte in src {
        for nibble in [byte >> 4, byte & 0x0f] {
            let step = DECODE[state][nibble as usize];
            if step.flags & FAIL != 0 {
                return Err(HpackError::Huffman);
            }
            if step.flags & EMIT != 0 {
                out.push(step.sym);
            }
            state = step.next as usize;
            accept = step.flags & ACCEPT != 0;
        }
    }
    if accept { Ok(()) } else { Err(HpackError::Huffman) }
}

// ---- Primitives (RFC 7541 §5) ----

/// Reads an integer with an `prefix`-bit prefix at `*pos`.
fn read_int(buf: &[u8], pos: &mut usize, prefix: u32) -> Result<usize, HpackError> {
    let mask = (1usize << prefix) - 1;
    let first = usize::from(*buf.get(*pos).ok_or(HpackError::Truncated)?) & mask;
    *pos += 1;
    if first < mask {
        return Ok(first);
    }
    let mut value = mask;
    let mut shift = 0;
    loop {
        let b = *buf.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        value += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
        if shift > 21 {
            return Err(HpackError::IntegerOverflow);
        }
    }
}

/// Writes `value` with a `prefix`-bit prefix after the bits `first`.
#[inline]
fn write_int(out: &mut Vec<u8>, first: u8, prefix: u32, mut value: usize) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        out.push(first | value as u8);
        return;
    }
    out.push(first | mask as u8);
    value -= mask;
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads a string literal's header at `*pos`: Huffman-coded or not, and its
/// bytes' place in `buf`.
fn read_string(buf: &[u8], pos: &mut usize) -> Result<(bool, usize, usize), HpackError> {
    let huffman = *buf.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = read_int(buf, pos, 7)?;
    let start = *pos;
    let end = start.checked_add(len).filter(|&e| e <= buf.len()).ok_or(HpackError::Truncated)?;
    *pos = end;
    Ok((huffman, start, end))
}

/// Writes a string literal as it is: Huffman coding would save a fifth of
/// its bytes at the cost of several instructions per byte, each message.
#[inline]
fn write_string(out: &mut Vec<u8>, s: &[u8]) {
    write_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

// ---- The dynamic table (RFC 7541 §4) ----

/// An entry's overhead in the table's size (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Where the name starts in `Table::bytes`; the value follows it.
    start: usize,
    name: usize,
    value: usize,
}

impl Entry {
    fn size(&self) -> usize {
        self.name + self.value + ENTRY_OVERHEAD
    }
}

/// The entries' names and values sit in one buffer, oldest first; evicted
/// ones stay until the dead bytes outgrow the table, then the live ones move
/// to the front (at most twice the table's bytes held, no allocation per entry).
#[derive(Debug)]
struct Table {
    bytes: Vec<u8>,
    /// Newest first: dynamic index 62 is `entries[0]`.
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
    /// Insertions and size updates so far: while it stays the same, an
    /// index names the same field.
    changes: u64,
}

impl Table {
    fn new(max: usize) -> Self {
        Self { bytes: Vec::new(), entries: VecDeque::new(), size: 0, max, changes: 0 }
    }

    /// The field at an HPACK index (static 1–61, then dynamic).
    fn get(&self, index: usize) -> Option<(&[u8], &[u8])> {
        match index {
            0 => None,
            1..=61 => Some(STATIC[index - 1]),
            _ => {
                let e = self.entries.get(index - 62)?;
                let name_end = e.start + e.name;
                Some((&self.bytes[e.start..name_end], &self.bytes[name_end..name_end + e.value]))
            }
        }
    }

    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            match self.entries.pop_back() {
                Some(e) => self.size -= e.size(),
                None => break,
            }
        }
        if self.entries.is_empty() {
            self.bytes.clear();
        }
    }

    fn set_max(&mut self, max: usize) {
        self.changes += 1;
        self.max = max;
        self.evict_to(max);
    }

    fn insert(&mut self, name: &[u8], value: &[u8]) {
        self.changes += 1;
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max {
            // RFC 7541 §4.4: the table empties and the field is not added.
            self.evict_to(0);
            return;
        }
        self.evict_to(self.max - size);
        let live = self.entries.back().map_or(self.bytes.len(), |e| e.start);
        if live >= self.max.max(1024) {
            self.bytes.drain(..live);
            for e in &mut self.entries {
                e.start -= live;
            }
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(name);
        self.bytes.extend_from_slice(value);
        self.entries.push_front(Entry { start, name: name.len(), value: value.len() });
        self.size += size;
    }
}

// ---- Decoder ----

/// Decodes the header blocks of one direction of one connection.
#[derive(Debug)]
pub struct Decoder {
    table: Table,
    /// The most a size update may set: the `SETTINGS_HEADER_TABLE_SIZE` announced.
    limit: usize,
    /// Huffman-decoded strings and names about to be inserted, reused.
    scratch: Vec<u8>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::with_table_size(DEFAULT_TABLE_SIZE)
    }
}

/// Where a decoded string lies: in the block, or in the scratch buffer.
#[derive(Clone, Copy)]
enum Lit {
    Block(usize, usize),
    Scratch(usize, usize),
}

impl Lit {
    fn get<'a>(self, block: &'a [u8], scratch: &'a [u8]) -> &'a [u8] {
        match self {
            Lit::Block(s, e) => &block[s..e],
            Lit::Scratch(s, e) => &scratch[s..e],
        }
    }
}

impl Decoder {
    /// A decoder whose table starts at, and may grow to, `size` bytes.
    pub fn with_table_size(size: usize) -> Self {
        Self { table: Table::new(size), limit: size, scratch: Vec::new() }
    }

    /// The dynamic table's current size, in RFC 7541's accounting.
    pub fn table_size(&self) -> usize {
        self.table.size
    }

    /// How many times the dynamic table has changed (an insertion or a
    /// size update): a block decoded while this stays the same, and that
    /// changed nothing itself, decodes to the same fields again.
    pub fn table_changes(&self) -> u64 {
        self.table.changes
    }

    /// Decodes one whole header block (HEADERS and its CONTINUATIONs,
    /// joined), handing each field to `field` in order.
    pub fn decode(&mut self, block: &[u8], mut field: impl FnMut(Field<'_>)) -> Result<(), HpackError> {
        let mut pos = 0;
        let mut first = true;
        while let Some(&b) = block.get(pos) {
            if b & 0x80 != 0 {
                let index = read_int(block, &mut pos, 7)?;
                let (name, value) = self.table.get(index).ok_or(HpackError::BadIndex(index))?;
                field(Field { name, value, never_indexed: false });
            } else if b & 0xe0 == 0x20 {
                if !first {
                    return Err(HpackError::LateSizeUpdate);
                }
                let size = read_int(block, &mut pos, 5)?;
                if size > self.limit {
                    return Err(HpackError::TableSize(size));
                }
                self.table.set_max(size);
                continue;
            } else {
                let insert = b & 0x40 != 0;
                self.literal(block, &mut pos, insert, b & 0xf0 == 0x10, &mut field)?;
            }
            first = false;
        }
        Ok(())
    }

    fn literal(
        &mut self,
        block: &[u8],
        pos: &mut usize,
        insert: bool,
        never_indexed: bool,
        field: &mut impl FnMut(Field<'_>),
    ) -> Result<(), HpackError> {
        let index = read_int(block, pos, if insert { 6 } else { 4 })?;
        self.scratch.clear();
        let name = match index {
            0 => Some(self.string(block, pos)?),
            _ => {
                let (name, _) = self.table.get(index).ok_or(HpackError::BadIndex(index))?;
                // Inserting may evict the entry the name comes from: copy it.
                insert.then(|| {
                    self.scratch.extend_from_slice(name);
                    Lit::Scratch(0, name.len())
                })
            }
        };
        let value = self.string(block, pos)?;
        let Decoder { table, scratch, .. } = self;
        let value = value.get(block, scratch);
        match name {
            Some(name) => {
                let name = name.get(block, scratch);
                field(Field { name, value, never_indexed });
                if insert {
                    table.insert(name, value);
                }
            }
            None => {
                let (name, _) = table.get(index).ok_or(HpackError::BadIndex(index))?;
                field(Field { name, value, never_indexed });
            }
        }
        Ok(())
    }

    /// Reads a string literal: in place, or Huffman-decoded into the scratch buffer.
    fn string(&mut self, block: &[u8], pos: &mut usize) -> Result<Lit, HpackError> {
        let (huffman, start, end) = read_string(block, pos)?;
        if !huffman {
            return Ok(Lit::Block(start, end));
        }
        let from = self.scratch.len();
        huffman_decode(&block[start..end], &mut self.scratch)?;
        Ok(Lit::Scratch(from, self.scratch.len()))
    }
}

// ---- Encoder ----

/// The kinds of header block a connection writes: each kind remembers its
/// own last block ([`Encoder::begin`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// A request's head (a client's side of a connection).
    Request = 0,
    /// A response's head, `:status` first.
    Response = 1,
    /// A trailer section.
    Trailers = 2,
}

/// Fields past this position in a block are not remembered (with
/// [`MEMO_BYTES`], at most about 8 KiB remembered per kind of block, and
/// a few hundred bytes for the heads seen in practice).
const MEMO_FIELDS: usize = 32;

/// A field longer than this (name and value) is not remembered, nor
/// indexed: one would take a large share of the table.
const MEMO_BYTES: usize = 224;

/// What the encoder knows of a remembered field.
#[derive(Clone, Copy, Debug, Default)]
enum Known {
    /// Nothing yet: it went as a literal.
    #[default]
    Nothing,
    /// The static table holds it whole, at this index.
    Static(u8),
    /// It was inserted in the peer's table: this entry, by number of insertion.
    Entry(u64),
}

/// One field of the last block of its kind at its position, as the caller
/// gave it (its name maybe with capitals).
#[derive(Debug, Default)]
struct Remembered {
    /// Its name and value, one after the other.
    bytes: Vec<u8>,
    name: usize,
    known: Known,
}

impl Remembered {
    #[inline]
    fn is(&self, name: &[u8], value: &[u8]) -> bool {
        self.name == name.len() && self.bytes.len() == name.len() + value.len() && {
            let (n, v) = self.bytes.split_at(self.name);
            n == name && v == value
        }
    }

    fn set(&mut self, name: &[u8], value: &[u8]) {
        self.bytes.clear();
        self.bytes.extend_from_slice(name);
        self.bytes.extend_from_slice(value);
        self.name = name.len();
        self.known = Known::Nothing;
    }
}

/// The peer decoder's dynamic table as this encoder fills it: only the
/// entries' sizes, which is all eviction needs (RFC 7541 §4.4).
#[derive(Debug, Default)]
struct Sizes {
    /// Newest first.
    entries: VecDeque<u32>,
    size: usize,
    /// Entries inserted so far: the newest is number `inserted - 1`.
    inserted: u64,
}

impl Sizes {
    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            match self.entries.pop_back() {
                Some(e) => self.size -= e as usize,
                None => break,
            }
        }
    }

    /// Inserts an entry of `size` (at most `max`); its number.
    fn insert(&mut self, size: usize, max: usize) -> u64 {
        self.evict_to(max - size);
        self.entries.push_front(size as u32);
        self.size += size;
        self.inserted += 1;
        self.inserted - 1
    }

    /// The HPACK index of entry number `entry`, while it is in the table.
    #[inline]
    fn index(&self, entry: u64) -> Option<usize> {
        let age = self.inserted - 1 - entry;
        (age < self.entries.len() as u64).then(|| 62 + age as usize)
    }
}

/// Encodes the header blocks of one direction of one connection.
#[derive(Debug)]
pub struct Encoder {
    /// The dynamic table size the peer's decoder was last told of (RFC
    /// 7541 §4.2): its default until the peer allows less.
    announced: usize,
    /// A size to announce at the start of the next block: the smallest the
    /// peer allowed since the last one, when that is less than `announced`.
    update: Option<usize>,
    /// A name with capitals, lowercased (HTTP/2 names are lowercase).
    lower: Vec<u8>,
    table: Sizes,
    /// The last block of each kind, field by field.
    memos: [Vec<Remembered>; 3],
    /// The block being written: its kind and its next field's position.
    kind: usize,
    position: usize,
}

impl Default for Encoder {
    fn default() -> Self {
        Self {
            announced: DEFAULT_TABLE_SIZE,
            update: None,
            lower: Vec::new(),
            table: Sizes::default(),
            memos: Default::default(),
            kind: 0,
            position: 0,
        }
    }
}

impl Encoder {
    /// Takes the peer's `SETTINGS_HEADER_TABLE_SIZE`. A larger table than
    /// the peer's decoder was last told of changes nothing (the encoder may
    /// use less); a smaller one is announced at the start of the next
    /// block, as its decoder may require.
    pub fn set_peer_table_size(&mut self, size: usize) {
        let smallest = self.update.map_or(size, |s| s.min(size));
        if smallest < self.announced {
            self.update = Some(smallest);
        }
    }

    /// Starts a header block of `kind`: writes a pending table size update.
    pub fn begin(&mut self, kind: Block, out: &mut Vec<u8>) {
        if let Some(size) = self.update.take() {
            write_int(out, 0x20, 5, size);
            self.announced = size;
            self.table.evict_to(size);
        }
        self.kind = kind as usize;
        self.position = 0;
    }

    /// Writes `:status`.
    pub fn status(&mut self, code: u16, out: &mut Vec<u8>) {
        let digits = [b'0' + (code / 100 % 10) as u8, b'0' + (code / 10 % 10) as u8, b'0' + (code % 10) as u8];
        self.field(b":status", &digits, out);
    }

    /// Writes one field; a name with capitals is sent lowercased.
    ///
    /// The field is first compared with the one at the same place in the
    /// last block of the same kind: when it is the same and the encoder
    /// knows its index (in the static table, or in the peer's while it
    /// holds the entry), the index is all it writes. A field the static
    /// table holds whole goes as its index. `set-cookie`, `authorization`,
    /// `proxy-authorization` and short cookies go as literals never indexed
    /// (RFC 7541 §7.1.3), so that an intermediary further on does not index
    /// them either. Any other field goes as a plain literal the first time
    /// it is in its place and, the second time in a row, as a literal the
    /// peer inserts in its table. A field that changes from one block to
    /// the next (a date, a request's id) is never inserted, so it cannot
    /// push the steady ones out; fields in the same order message after
    /// message, as one client, one endpoint or one gRPC service sends them,
    /// cost a comparison and a byte each.
    pub fn field(&mut self, name: &[u8], value: &[u8], out: &mut Vec<u8>) {
        let position = self.position;
        self.position += 1;
        let remembered = position < MEMO_FIELDS && name.len() + value.len() <= MEMO_BYTES;
        let mut again = false;
        if remembered {
            let memo = &mut self.memos[self.kind];
            if memo.len() <= position {
                memo.resize_with(position + 1, Remembered::default);
            }
            let r = &mut memo[position];
            if r.is(name, value) {
                match r.known {
                    Known::Static(i) => return write_int(out, 0x80, 7, usize::from(i)),
                    Known::Entry(e) => match self.table.index(e) {
                        Some(index) => return write_int(out, 0x80, 7, index),
                        None => again = true,
                    },
                    Known::Nothing => again = true,
                }
            } else {
                r.set(name, value);
            }
        }
        let at = remembered.then_some(position);
        // Every byte looked at (no early exit), so the check vectorizes.
        if name.iter().fold(false, |upper, b| upper | b.is_ascii_uppercase()) {
            let mut lower = std::mem::take(&mut self.lower);
            lower.clear();
            lower.extend(name.iter().map(u8::to_ascii_lowercase));
            self.literal(&lower, value, at, again, out);
            self.lower = lower;
        } else {
            self.literal(name, value, at, again, out);
        }
    }

    /// Writes `name` (lowercase) and `value`, remembered at position `at`
    /// (when it may be), there `again` (the same as in the last block).
    fn literal(&mut self, name: &[u8], value: &[u8], at: Option<usize>, again: bool, out: &mut Vec<u8>) {
        let by_name = static_name(name);
        if let Some((first, count)) = by_name
            && let Some(i) = (first..first + count).find(|&i| STATIC[i - 1].1 == value)
        {
            if let Some(at) = at {
                // Static indexes are at most 61.
                self.memos[self.kind][at].known = Known::Static(i as u8);
            }
            return write_int(out, 0x80, 7, i);
        }
        let mut first = match name {
            b"set-cookie" | b"authorization" | b"proxy-authorization" => 0x10,
            b"cookie" if value.len() < 20 => 0x10,
            _ => 0x00,
        };
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if let Some(at) = at
            && again
            && first == 0x00
            && size <= self.announced
        {
            self.memos[self.kind][at].known = Known::Entry(self.table.insert(size, self.announced));
            first = 0x40;
        }
        // A literal: with incremental indexing (a six-bit name index),
        // without or never indexed (four bits).
        let prefix = if first == 0x40 { 6 } else { 4 };
        match by_name {
            Some((i, _)) => write_int(out, first, prefix, i),
            None => {
                out.push(first);
                write_string(out, name);
            }
        }
        write_string(out, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The length of `src` Huffman-coded.
    fn huffman_len(src: &[u8]) -> usize {
        let bits: usize = src.iter().map(|&b| usize::from(LENGTHS[b as usize])).sum();
        bits.div_ceil(8)
    }

    /// Appends the Huffman coding of `src`, padded with the start of EOS.
    fn huffman_encode(src: &[u8], out: &mut Vec<u8>) {
        let mut acc = 0u64;
        let mut bits = 0u32;
        for &b in src {
            let len = u32::from(LENGTHS[b as usize]);
            acc = (acc << len) | u64::from(CODES[b as usize]);
            bits += len;
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
            acc &= (1 << bits) - 1;
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
        }
    }

    #[test]
    fn every_static_name_is_found_with_its_first_index_and_count() {
        for (i, (name, _)) in STATIC.iter().enumerate() {
            let first = STATIC.iter().position(|(n, _)| n == name).unwrap() + 1;
            let count = STATIC.iter().filter(|(n, _)| n == name).count();
            assert_eq!(static_name(name), Some((first, count)), "index {}", i + 1);
        }
        for name in [&b"x-forwarded-for"[..], b"te", b"grpc-status", b"hosts", b"", b"Host"] {
            assert_eq!(static_name(name), None);
        }
    }

    /// Appends a literal with incremental indexing and a new name (RFC
    /// 7541 §6.2.1), which the proxy's encoder never sends.
    fn indexed(block: &mut Vec<u8>, name: &[u8], value: &[u8]) {
        block.push(0x40);
        for s in [name, value] {
            write_string(block, s);
        }
    }

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String)>, HpackError> {
        let mut out = Vec::new();
        d.decode(block, |f| {
            out.push((String::from_utf8_lossy(f.name).into_owned(), String::from_utf8_lossy(f.value).into_owned()))
        })?;
        Ok(out)
    }

    fn fields(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect()
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// A block in hex, the fields it holds, the table's size after it.
    type Step<'a> = (&'a str, &'a [(&'a str, &'a str)], usize);

    /// Decodes each block in turn: the fields it holds, and the table's
    /// size after it.
    fn check_sequence(d: &mut Decoder, steps: &[Step<'_>]) {
        for (i, (block, want, size)) in steps.iter().enumerate() {
            assert_eq!(decode_all(d, &hex(block)).unwrap(), fields(want), "block {i}");
            assert_eq!(d.table_size(), *size, "block {i}");
        }
    }

    #[test]
    fn the_rfc_requests_with_huffman_decode_and_fill_the_table() {
        // RFC 7541 C.4.1 – C.4.3.
        let authority = (":authority", "www.example.com");
        let get = [(":method", "GET"), (":scheme", "http"), (":path", "/"), authority];
        let again = [get[0], get[1], get[2], authority, ("cache-control", "no-cache")];
        let custom =
            [get[0], (":scheme", "https"), (":path", "/index.html"), authority, ("custom-key", "custom-value")];
        check_sequence(
            &mut Decoder::default(),
            &[
                ("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff", &get, 57),
                ("8286 84be 5886 a8eb 1064 9cbf", &again, 110),
                ("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf", &custom, 164),
            ],
        );
    }

    #[test]
    fn the_rfc_responses_evict_the_oldest_entries_of_a_small_table() {
        // RFC 7541 C.6.1 – C.6.3, with a 256-byte table.
        let (private, location) = (("cache-control", "private"), ("location", "https://www.example.com"));
        let date = ("date", "Mon, 21 Oct 2013 20:13:21 GMT");
        let cookie = ("set-cookie", "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1");
        let later = ("date", "Mon, 21 Oct 2013 20:13:22 GMT");
        check_sequence(
            &mut Decoder::with_table_size(256),
            &[
                (
                    "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
                    &[(":status", "302"), private, date, location],
                    222,
                ),
                ("4883 640e ffc1 c0bf", &[(":status", "307"), private, date, location], 222),
                (
                    "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
                    &[(":status", "200"), private, later, location, ("content-encoding", "gzip"), cookie],
                    215,
                ),
            ],
        );
    }

    #[test]
    fn huffman_codes_match_the_rfc_examples_both_ways() {
        for (text, coded) in [
            ("www.example.com", "f1e3 c2e5 f23a 6ba0 ab90 f4ff"),
            ("no-cache", "a8eb 1064 9cbf"),
            ("custom-key", "25a8 49e9 5ba9 7d7f"),
            ("302", "6402"),
            ("private", "aec3 771a 4b"),
        ] {
            let mut out = Vec::new();
            huffman_encode(text.as_bytes(), &mut out);
            assert_eq!(out, hex(coded), "{text}");
            assert_eq!(huffman_len(text.as_bytes()), out.len());
            let mut back = Vec::new();
            huffman_decode(&out, &mut back).unwrap();
            assert_eq!(back, text.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        let mut out = Vec::new();
        huffman_encode(&all, &mut out);
        let mut back = Vec::new();
        huffman_decode(&out, &mut back).unwrap();
        assert_eq!(back, all);
    }

    #[test]
    fn huffman_strings_with_eos_or_bad_padding_are_refused() {
        let mut out = Vec::new();
        // Thirty ones: EOS itself.
        assert_eq!(huffman_decode(&[0xff, 0xff, 0xff, 0xfc], &mut out), Err(HpackError::Huffman));
        // 'a' (00011) then padding of zeros.
        assert_eq!(huffman_decode(&[0x18], &mut out), Err(HpackError::Huffman));
        // 'a' then eleven ones: padding longer than seven bits.
        assert_eq!(huffman_decode(&[0x1f, 0xff], &mut out), Err(HpackError::Huffman));
        // 'a' then three ones: fine.
        out.clear();
        assert_eq!(huffman_decode(&[0x1f], &mut out), Ok(()));
        assert_eq!(out, b"a");
    }

    #[test]
    fn malformed_blocks_are_refused_with_the_reason() {
        let mut d = Decoder::default();
        assert_eq!(decode_all(&mut d, &[0x80]), Err(HpackError::BadIndex(0)));
        assert_eq!(decode_all(&mut d, &[0xbe]), Err(HpackError::BadIndex(62)));
        assert_eq!(decode_all(&mut d, &[0x7e, 0x01, b'a']), Err(HpackError::BadIndex(62)));
        assert_eq!(decode_all(&mut d, &[0x40, 0x0a, b'a']), Err(HpackError::Truncated));
        assert_eq!(decode_all(&mut d, &[0x40, 0x01]), Err(HpackError::Truncated));
        assert_eq!(decode_all(&mut d, &[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]), Err(HpackError::IntegerOverflow));
        assert_eq!(decode_all(&mut d, &[0xff, 0x80]), Err(HpackError::Truncated));
        assert_eq!(decode_all(&mut d, &[0x82, 0x20]), Err(HpackError::LateSizeUpdate));
        let mut update = Vec::new();
        write_int(&mut update, 0x20, 5, 4097);
        assert_eq!(decode_all(&mut d, &update), Err(HpackError::TableSize(4097)));
        // Nothing refused changed the table.
        assert_eq!(d.table_size(), 0);
    }

    #[test]
    fn size_updates_at_the_start_shrink_and_empty_the_table() {
        let mut d = Decoder::default();
        let mut block = Vec::new();
        indexed(&mut block, b"x-one", b"1");
        decode_all(&mut d, &block).unwrap();
        assert_eq!(d.table_size(), 5 + 1 + 32);
        // Two updates (to 0, then back to 4096) then an indexed field.
        assert_eq!(decode_all(&mut d, &[0x20, 0x3f, 0xe1, 0x1f, 0x82]).unwrap(), fields(&[(":method", "GET")]));
        assert_eq!(d.table_size(), 0);
        assert_eq!(decode_all(&mut d, &[0xbe]), Err(HpackError::BadIndex(62)));
    }

    #[test]
    fn the_encoder_indexes_what_repeats_in_place_and_says_when_the_table_shrinks() {
        let mut e = Encoder::default();
        let mut d = Decoder::default();
        let response = [("Content-Type", "application/json"), ("server", "nginx"), ("x-id", "7")];
        let want = [
            (":status", "200"),
            (":status", "503"),
            ("content-type", "application/json"),
            ("server", "nginx"),
            ("x-id", "7"),
        ];
        let mut blocks = Vec::new();
        for round in 0..4 {
            let mut block = Vec::new();
            e.begin(Block::Response, &mut block);
            e.status(200, &mut block);
            e.status(503, &mut block);
            for (n, v) in response {
                e.field(n.as_bytes(), v.as_bytes(), &mut block);
            }
            assert_eq!(decode_all(&mut d, &block).unwrap(), fields(&want), "round {round}");
            blocks.push(block);
        }
        // First plain literals: :status 200 as static index 8, 503 as its
        // static name and three digits, content-type (31) and server (54)
        // by static name with four-bit prefixes, x-id with its name; every
        // string as it is.
        let mut first = vec![0x88, 0x08, 3, b'5', b'0', b'3', 0x0f, 31 - 15, 16];
        first.extend_from_slice(b"application/json");
        first.extend_from_slice(&[0x0f, 54 - 15, 5]);
        first.extend_from_slice(b"nginx");
        first.extend_from_slice(&[0x00, 4]);
        first.extend_from_slice(b"x-id");
        first.extend_from_slice(&[1, b'7']);
        // The same fields in the same places again: literals the peer
        // inserts (six-bit name indexes).
        let mut second = vec![0x88, 0x48, 3, b'5', b'0', b'3', 0x40 | 31, 16];
        second.extend_from_slice(b"application/json");
        second.extend_from_slice(&[0x40 | 54, 5]);
        second.extend_from_slice(b"nginx");
        second.extend_from_slice(&[0x40, 4]);
        second.extend_from_slice(b"x-id");
        second.extend_from_slice(&[1, b'7']);
        // From then on a byte each: the newest entry is 62.
        let steady = vec![0x88, 0x80 | 65, 0x80 | 64, 0x80 | 63, 0x80 | 62];
        assert_eq!(blocks, [first, second, steady.clone(), steady]);
        assert_eq!(d.table_size(), (7 + 3 + 32) + (12 + 16 + 32) + (6 + 5 + 32) + (4 + 1 + 32));
        // Every status code there is goes through, in or out of the table.
        for code in [100, 200, 204, 206, 304, 400, 404, 500, 599, 999] {
            let mut block = Vec::new();
            e.begin(Block::Response, &mut block);
            e.status(code, &mut block);
            assert_eq!(decode_all(&mut d, &block).unwrap(), fields(&[(":status", &code.to_string())]));
        }
        // The peer shrinks its table to 100, then to 0, then allows 4096
        // again: the smallest opens the next block (and only it), the
        // table empties, and nothing is inserted or indexed from then on.
        e.set_peer_table_size(100);
        e.set_peer_table_size(0);
        e.set_peer_table_size(4096);
        for round in 0..3 {
            let mut block = Vec::new();
            e.begin(Block::Response, &mut block);
            e.field(b"server", b"nginx", &mut block);
            let mut want = if round == 0 { vec![0x20] } else { vec![] };
            want.extend_from_slice(&[0x0f, 54 - 15, 5, b'n', b'g', b'i', b'n', b'x']);
            assert_eq!(block, want, "round {round}");
            assert_eq!(decode_all(&mut d, &block).unwrap(), fields(&[("server", "nginx")]));
            assert_eq!(d.table_size(), 0);
        }
        e.set_peer_table_size(64);
        let mut block = Vec::new();
        e.begin(Block::Response, &mut block);
        assert!(block.is_empty(), "0 was announced; 64 is more");
    }

    #[test]
    fn fields_that_change_are_never_inserted_and_each_kind_remembers_its_own() {
        let mut e = Encoder::default();
        let mut d = Decoder::default();
        for i in 0..50 {
            // A request's id changes each time; its neighbours do not.
            let id = format!("req-{i}");
            let mut block = Vec::new();
            e.begin(Block::Request, &mut block);
            e.field(b"x-request-id", id.as_bytes(), &mut block);
            e.field(b"content-type", b"application/grpc", &mut block);
            assert_eq!(
                decode_all(&mut d, &block).unwrap(),
                fields(&[("x-request-id", &id), ("content-type", "application/grpc")])
            );
            // Trailers between the requests do not disturb their memory.
            let mut trailers = Vec::new();
            e.begin(Block::Trailers, &mut trailers);
            e.field(b"grpc-status", b"0", &mut trailers);
            assert_eq!(decode_all(&mut d, &trailers).unwrap(), fields(&[("grpc-status", "0")]));
            if i >= 2 {
                // The id as a literal by name (2 + 12 bytes) and value, content-type as an index.
                assert_eq!(block.len(), 2 + 12 + 1 + id.len() + 1, "round {i}: {block:?}");
                assert_eq!(trailers.len(), 1, "round {i}");
            }
        }
        // Only the two steady fields were inserted, once each.
        assert_eq!(d.table_size(), (12 + 16 + 32) + (11 + 1 + 32));
    }

    #[test]
    fn evicted_entries_are_inserted_again_as_the_peer_evicts_them() {
        // A table of 200 bytes holds four of these fields (46 bytes each),
        // not the six of a block: each block evicts what the next needs.
        let mut e = Encoder::default();
        e.set_peer_table_size(200);
        let mut d = Decoder::with_table_size(200);
        let names: Vec<String> = (0..6).map(|i| format!("x-field-{i}")).collect();
        for round in 0..20 {
            let mut block = Vec::new();
            e.begin(Block::Response, &mut block);
            for n in &names {
                e.field(n.as_bytes(), b"value", &mut block);
            }
            let want: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "value")).collect();
            assert_eq!(decode_all(&mut d, &block).unwrap(), fields(&want), "round {round}");
            assert!(d.table_size() <= 200);
            assert_eq!(d.table_size(), e.table.size, "round {round}: both sides evicted alike");
        }
    }

    #[test]
    fn long_fields_and_fields_past_the_remembered_ones_go_as_literals() {
        let mut e = Encoder::default();
        let mut d = Decoder::default();
        let long = "v".repeat(MEMO_BYTES);
        for _ in 0..3 {
            let mut block = Vec::new();
            e.begin(Block::Response, &mut block);
            for i in 0..MEMO_FIELDS + 4 {
                let value = if i == 0 { long.as_str() } else { "x" };
                e.field(format!("x-{i}").as_bytes(), value.as_bytes(), &mut block);
            }
            decode_all(&mut d, &block).unwrap();
        }
        // Positions 1 to MEMO_FIELDS - 1 are indexed; the long field and
        // those past them are not.
        let entry = |i: usize| format!("x-{i}").len() + 1 + 32;
        assert_eq!(d.table_size(), (1..MEMO_FIELDS).map(entry).sum::<usize>());
    }

    #[test]
    fn sensitive_fields_are_never_indexed() {
        let mut e = Encoder::default();
        let mut d = Decoder::default();
        for _ in 0..3 {
            let mut block = Vec::new();
            e.begin(Block::Response, &mut block);
            e.field(b"set-cookie", b"id=1", &mut block);
            e.field(b"authorization", b"Bearer x", &mut block);
            let mut never = Vec::new();
            d.decode(&block, |f| never.push(f.never_indexed)).unwrap();
            assert_eq!(never, [true, true]);
            assert_eq!(d.table_size(), 0, "not even when they repeat");
        }
    }

    #[test]
    fn a_churning_table_keeps_its_buffer_bounded() {
        let mut d = Decoder::with_table_size(200);
        for i in 0..2000 {
            let mut block = Vec::new();
            let value = format!("value-{i}-{}", "x".repeat(i % 40));
            indexed(&mut block, b"x-churn", value.as_bytes());
            indexed(&mut block, b"x-fixed", b"same");
            let got = decode_all(&mut d, &block).unwrap();
            assert_eq!(got, fields(&[("x-churn", &value), ("x-fixed", "same")]));
            assert!(d.table.size <= 200);
            assert!(d.table.bytes.len() <= 2 * 1024 + 200, "{}", d.table.bytes.len());
        }
    }
}
