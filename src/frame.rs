//! Cap'n Proto stream framing that commits memory only as bytes arrive.
//!
//! A frame is a segment table (segment count − 1, then each segment's size
//! in words, padded to a word) followed by the segments. The header alone
//! says how large the frame is; a reader that allocates that size up front
//! (as `capnp_futures::serialize::try_read_message` does) lets a client make
//! the server zero-fill `max-frame-bytes` by sending eight bytes. Here the
//! declared size is only *checked* against the limit; the buffer grows by at
//! most [`READ_CHUNK`] beyond what has been received, so a connection costs
//! what it actually sent plus a small constant, whatever its headers claim.
//!
//! [`FrameBuffer`] is a plain byte buffer with no I/O of its own: the caller
//! reads from its socket into [`FrameBuffer::read_space`], reports how much
//! arrived with [`FrameBuffer::filled`], and takes complete frames out with
//! [`FrameBuffer::next_frame`]. That keeps it testable without sockets (see
//! the property tests in `tests/frame_fuzz.rs`).

use capnp::message::{Reader, ReaderOptions};
use capnp::serialize::NoAllocSliceSegments;
use capnp::Word;

/// Most segments a frame may have (capnp's own reader refuses 512 and up).
pub const MAX_SEGMENTS: usize = 511;

/// The largest step by which the buffer grows past what has been received.
pub const READ_CHUNK: usize = 64 << 10;

/// What an idle connection keeps: pipelined small requests are read many per
/// syscall, and after a large frame the buffer shrinks back to this.
pub const BASE_CAPACITY: usize = 16 << 10;

/// Why a byte stream is not a sequence of acceptable frames. Either way the
/// framing is lost: nothing after it can be trusted to start a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("segment table declares {0} segments (1 to {MAX_SEGMENTS} allowed)")]
    BadSegmentCount(u64),
    #[error("frame of {declared} bytes exceeds max-frame-bytes {limit}")]
    TooLarge { declared: u64, limit: usize },
}

/// The total length in bytes (segment table included) of the frame that
/// starts at `bytes[0]`, once enough of its segment table has arrived;
/// `Ok(None)` while it has not. Checks the declared size against
/// `max_frame_bytes` before a single byte of the body is needed.
pub fn frame_len(bytes: &[u8], max_frame_bytes: usize) -> Result<Option<usize>, FrameError> {
    let Some(first) = bytes.get(..4) else {
        return Ok(None);
    };
    let count = u64::from(u32::from_le_bytes([first[0], first[1], first[2], first[3]])) + 1;
    if count as usize > MAX_SEGMENTS {
        return Err(FrameError::BadSegmentCount(count));
    }
    let count = count as usize;
    // 4 bytes of count, 4 per segment size, padded to a whole word.
    let table_len = (4 + 4 * count).div_ceil(8) * 8;
    let Some(sizes) = bytes.get(4..4 + 4 * count) else {
        return Ok(None);
    };
    let words: u64 = sizes
        .chunks_exact(4)
        .map(|s| u64::from(u32::from_le_bytes([s[0], s[1], s[2], s[3]])))
        .sum();
    let declared = table_len as u64 + words * 8;
    if declared > max_frame_bytes as u64 {
        return Err(FrameError::TooLarge {
            declared,
            limit: max_frame_bytes,
        });
    }
    Ok(Some(declared as usize))
}

/// A connection's receive buffer. Word-backed so every frame it hands out
/// is 8-byte aligned, as capnp's zero-copy reader requires (frames are whole
/// words long, so each one starts where the previous one ended, aligned).
pub struct FrameBuffer {
    words: Vec<Word>,
    /// Received bytes not yet handed out are `[start, end)`.
    start: usize,
    end: usize,
    max_frame_bytes: usize,
}

impl FrameBuffer {
    /// An empty buffer; it allocates nothing until the first read.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            words: Vec::new(),
            start: 0,
            end: 0,
            max_frame_bytes,
        }
    }

    /// Bytes of memory the buffer holds (what the connection costs).
    pub fn capacity(&self) -> usize {
        self.words.len() * 8
    }

    /// Received bytes not yet taken as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    fn bytes(&self) -> &[u8] {
        Word::words_to_bytes(&self.words)
    }

    /// Where the next read should go. The buffer grows only as far as the
    /// frame in progress needs, by at most [`READ_CHUNK`] past what has been
    /// received, and at least to [`BASE_CAPACITY`] (so small pipelined
    /// frames arrive many per read). Fails when the frame in progress
    /// declares an unacceptable size.
    pub fn read_space(&mut self) -> Result<&mut [u8], FrameError> {
        self.prepare_read()?;
        Ok(self.spare())
    }

    /// Grows (or compacts) the buffer for the next read, as
    /// [`read_space`](Self::read_space) does, and returns its capacity.
    pub fn prepare_read(&mut self) -> Result<usize, FrameError> {
        let needed = match frame_len(&self.bytes()[self.start..self.end], self.max_frame_bytes)? {
            Some(len) => len.saturating_sub(self.buffered()),
            // The segment table's first word, or the rest of the table.
            None => 8 * (MAX_SEGMENTS / 2 + 1),
        };
        // Grow in steps no larger than what has already arrived (and at most
        // READ_CHUNK), so a header that lies costs only the base buffer.
        let step = needed.clamp(1, READ_CHUNK.min(self.buffered().max(BASE_CAPACITY)));
        let want_end = self.buffered() + step;
        let target = want_end.max(BASE_CAPACITY);
        if self.start > 0 && self.capacity() < self.start + target {
            // Move the unconsumed tail to the front instead of growing.
            let (start, end) = (self.start, self.end);
            Word::words_to_bytes_mut(&mut self.words).copy_within(start..end, 0);
            self.end -= start;
            self.start = 0;
        }
        if self.capacity() < self.start + target {
            let words = (self.start + target).div_ceil(8);
            self.words.resize(words, capnp::word(0, 0, 0, 0, 0, 0, 0, 0));
        }
        Ok(self.capacity())
    }

    /// The free space after the received bytes (see [`prepare_read`](Self::prepare_read)).
    pub fn spare(&mut self) -> &mut [u8] {
        let end = self.end;
        &mut Word::words_to_bytes_mut(&mut self.words)[end..]
    }

    /// `n` bytes were read into the space [`read_space`](Self::read_space) gave.
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.capacity());
    }

    /// Whether part of a frame has arrived but not all of it.
    pub fn partial(&self) -> bool {
        self.buffered() > 0
    }

    /// Takes the next complete frame, if one has fully arrived, and calls
    /// `decode` on it (a zero-copy reader over the buffer). Returns the
    /// frame's length with what `decode` made of it, or `Ok(None)` while the
    /// next frame is incomplete.
    pub fn next_frame<T>(
        &mut self,
        options: ReaderOptions,
        decode: impl FnOnce(Result<Reader<NoAllocSliceSegments<'_>>, capnp::Error>) -> T,
    ) -> Result<Option<(usize, T)>, FrameError> {
        let Some(len) = frame_len(&self.bytes()[self.start..self.end], self.max_frame_bytes)? else {
            return Ok(None);
        };
        if self.buffered() < len {
            return Ok(None);
        }
        let (start, end) = (self.start, self.start + len);
        self.start = end;
        let mut slice = &Word::words_to_bytes(&self.words)[start..end];
        let out = decode(capnp::serialize::read_message_from_flat_slice_no_alloc(
            &mut slice, options,
        ));
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            // A large frame is done: give its memory back.
            if self.capacity() > BASE_CAPACITY {
                self.words = Vec::new();
            }
        }
        Ok(Some((len, out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capnp::message::Builder;

    fn frame(text: &str) -> Vec<u8> {
        let mut message = Builder::new_default();
        message.set_root(text).expect("text root");
        capnp::serialize::write_message_to_words(&message)
    }

    fn read_text(r: Result<Reader<NoAllocSliceSegments<'_>>, capnp::Error>) -> String {
        r.and_then(|r| r.get_root::<capnp::text::Reader<'_>>()?.to_string().map_err(Into::into))
            .expect("frame decodes")
    }

    fn feed(buffer: &mut FrameBuffer, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let space = buffer.read_space().expect("acceptable frame");
            let n = space.len().min(rest.len());
            space[..n].copy_from_slice(&rest[..n]);
            buffer.filled(n);
            rest = &rest[n..];
        }
    }

    #[test]
    fn a_header_alone_commits_no_more_than_the_base() {
        let mut buffer = FrameBuffer::new(16 << 20);
        // One segment of 2,097,151 words: just under 16 MiB.
        feed(&mut buffer, &[0, 0, 0, 0, 0xff, 0xff, 0x1f, 0]);
        buffer.read_space().expect("within the limit");
        assert!(buffer.capacity() <= BASE_CAPACITY + 8, "{}", buffer.capacity());
        assert_eq!(buffer.next_frame(ReaderOptions::new(), |_| ()), Ok(None));
        assert!(buffer.partial());
    }

    #[test]
    fn oversized_and_bad_tables_are_refused_from_the_header() {
        let mut buffer = FrameBuffer::new(1 << 20);
        feed(&mut buffer, &[0, 0, 0, 0, 0, 0, 0x20, 0]);
        assert!(matches!(buffer.read_space(), Err(FrameError::TooLarge { .. })));
        assert_eq!(
            frame_len(&[0xff, 0xff, 0xff, 0xff], 1 << 20),
            Err(FrameError::BadSegmentCount(1 << 32))
        );
        assert_eq!(frame_len(&[0, 2, 0, 0], 1 << 20), Err(FrameError::BadSegmentCount(513)));
    }

    #[test]
    fn frames_split_and_pipelined_come_out_whole_and_in_order() {
        let mut stream = Vec::new();
        let texts: Vec<String> = (0..200).map(|i| "x".repeat(i * 37)).collect();
        for t in &texts {
            stream.extend(frame(t));
        }
        for split in [1, 7, 4096, stream.len()] {
            let mut buffer = FrameBuffer::new(1 << 20);
            let mut out = Vec::new();
            for piece in stream.chunks(split) {
                feed(&mut buffer, piece);
                while let Some((_, text)) = buffer.next_frame(ReaderOptions::new(), read_text).expect("frames") {
                    out.push(text);
                }
            }
            assert_eq!(out, texts, "split {split}");
            assert_eq!(buffer.buffered(), 0);
        }
    }

    #[test]
    fn a_large_frame_gives_its_memory_back() {
        let big = frame(&"y".repeat(1 << 20));
        let mut buffer = FrameBuffer::new(4 << 20);
        feed(&mut buffer, &big);
        assert!(buffer.capacity() >= big.len());
        let (len, text) = buffer.next_frame(ReaderOptions::new(), read_text).unwrap().unwrap();
        assert_eq!(len, big.len());
        assert_eq!(text.len(), 1 << 20);
        assert_eq!(buffer.capacity(), 0);
    }
}
