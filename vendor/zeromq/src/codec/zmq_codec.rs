use super::command::ZmqCommand;
use super::error::CodecError;
use super::greeting::ZmqGreeting;
use super::Message;
use crate::{SocketOptions, ZmqMessage};

use asynchronous_codec::{Decoder, Encoder};
use bytes::{Buf, Bytes, BytesMut};

use std::convert::TryFrom;

#[derive(Debug, Clone, Copy)]
struct Frame {
    command: bool,
    long: bool,
    more: bool,
}

#[derive(Debug)]
enum DecoderState {
    Greeting,
    FrameHeader,
    FrameLen(Frame),
    Frame(Frame),
}

#[derive(Debug)]
pub struct ZmqCodec {
    state: DecoderState,
    waiting_for: usize, // Number of bytes needed to decode frame
    // Needed to store incoming multipart message
    // This allows to encapsulate its processing inside codec and not expose
    // internal details to higher levels
    buffered_message: Option<ZmqMessage>,
    max_read_chunk_size: usize,
    // ots patch: limits checked on each frame header, before any allocation.
    max_message_size: Option<usize>,
    max_message_frames: Option<usize>,
    /// Bytes of the message being assembled, frames so far included.
    buffered_bytes: usize,
}

impl ZmqCodec {
    pub fn new() -> Self {
        Self::with_options(&SocketOptions::default())
    }

    pub(crate) fn with_options(options: &SocketOptions) -> Self {
        Self {
            state: DecoderState::Greeting,
            waiting_for: 64, // len of the greeting frame
            buffered_message: None,
            max_read_chunk_size: options.read_buffer_max_size,
            max_message_size: options.max_message_size,
            max_message_frames: options.max_message_frames,
            buffered_bytes: 0,
        }
    }

    /// Returns the minimum additional bytes needed before decode can progress.
    pub(crate) fn bytes_needed(&self, buffered_len: usize) -> usize {
        self.waiting_for.saturating_sub(buffered_len)
    }
}

impl Default for ZmqCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder for ZmqCodec {
    type Error = CodecError;
    type Item = Message;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        // A single read can contain thousands of frames; keep stack use independent of that count.
        loop {
            if src.len() < self.waiting_for {
                // The final read may coalesce bytes from the following frame. Reserve
                // its headroom now rather than grow shared storage again at the frame tail.
                // Qualifying retained frames must leave a full chunk for the next read.
                // For frames near one chunk, spare shared storage makes the next
                // almost-complete frame copy its body when reserve detaches it from
                // a retained predecessor. Limit headroom to frames spanning more
                // than two chunks, where it adds less than half the body size.
                let reserve_to = if self.waiting_for > 2 * self.max_read_chunk_size {
                    // Frame lengths are validated with this headroom before entering Frame.
                    self.waiting_for + self.max_read_chunk_size
                } else {
                    self.waiting_for
                };
                // ots patch: with a message size limit set, reserve at most two
                // read chunks or twice as much as already arrived (so a large
                // frame's buffer at most triples at each step: a 1 MiB frame is
                // moved twice while it arrives, not four times): memory follows
                // bytes actually received, not what a peer declared.
                let mut additional = reserve_to - src.len();
                if self.max_message_size.is_some() {
                    additional = additional
                        .min((2 * self.max_read_chunk_size).max(src.len().saturating_mul(2)));
                }
                src.reserve(additional);
                return Ok(None);
            }
            match self.state {
                DecoderState::Greeting => {
                    if src[0] != 0xff {
                        return Err(CodecError::Decode("Bad first byte of greeting"));
                    }
                    self.state = DecoderState::FrameHeader;
                    self.waiting_for = 1;
                    return Ok(Some(Message::Greeting(ZmqGreeting::try_from(
                        src.split_to(64).freeze(),
                    )?)));
                }
                DecoderState::FrameHeader => {
                    let flags = src.get_u8();

                    let frame = Frame {
                        command: (flags & 0b0000_0100) != 0,
                        long: (flags & 0b0000_0010) != 0,
                        more: (flags & 0b0000_0001) != 0,
                    };
                    self.state = DecoderState::FrameLen(frame);
                    self.waiting_for = if frame.long { 8 } else { 1 };
                }
                DecoderState::FrameLen(frame) => {
                    let frame_len = if frame.long {
                        let len = usize::try_from(src.get_u64()).map_err(|_error| {
                            CodecError::Decode("Frame length exceeds read buffer capacity")
                        })?;
                        // The reader may prepare a full read chunk at the frame tail.
                        // Reject unrepresentable lengths here, before reserve or resize.
                        len.checked_add(self.max_read_chunk_size)
                            .filter(|&capacity| isize::try_from(capacity).is_ok())
                            .ok_or(CodecError::Decode(
                                "Frame length exceeds read buffer capacity",
                            ))?;
                        len
                    } else {
                        usize::from(src.get_u8())
                    };
                    // ots patch: refuse oversized frames and messages here,
                    // before the buffer is sized for them.
                    if let Some(limit) = self.max_message_size {
                        let total = if frame.command {
                            frame_len
                        } else {
                            self.buffered_bytes.saturating_add(frame_len)
                        };
                        if total > limit {
                            return Err(CodecError::Decode(
                                "Message exceeds the maximum message size",
                            ));
                        }
                    }
                    if !frame.command {
                        let frames = self.buffered_message.as_ref().map_or(0, |m| m.len());
                        if self.max_message_frames.is_some_and(|limit| frames >= limit) {
                            return Err(CodecError::Decode(
                                "Message exceeds the maximum number of frames",
                            ));
                        }
                        self.buffered_bytes = self.buffered_bytes.saturating_add(frame_len);
                    }
                    self.state = DecoderState::Frame(frame);
                    self.waiting_for = frame_len;
                }
                DecoderState::Frame(frame) => {
                    let data = take_frame(src, self.waiting_for, self.max_read_chunk_size);
                    self.state = DecoderState::FrameHeader;
                    self.waiting_for = 1;
                    if frame.command {
                        return Ok(Some(Message::Command(ZmqCommand::try_from(data.freeze())?)));
                    }

                    // process incoming message frame
                    match &mut self.buffered_message {
                        Some(v) => v.push_back(data.freeze()),
                        None => self.buffered_message = Some(ZmqMessage::from(data.freeze())),
                    }

                    if !frame.more {
                        self.buffered_bytes = 0;
                        // Quoth the Raven “Nevermore.”
                        return Ok(Some(Message::Message(
                            self.buffered_message
                                .take()
                                .expect("Corrupted decoder state"),
                        )));
                    }
                }
            }
        }
    }
}

/// ots patch: a frame at least this long (a file chunk, not a batch of log
/// lines) leaves the decoder in a buffer of its own (see `take_frame`) and
/// is written from where it is (`ZmqFramedWrite`). From 64 KiB, log batches
/// lost their coalescing and secured ingestion slowed by an eighth.
pub(crate) const LARGE_FRAME: usize = 256 * 1024;

/// Splits the next `len` bytes off `src` as a frame. A large frame keeps
/// the buffer it arrived in to itself: what was read past its end (at most
/// a read chunk, or an eighth of the frame; copied) moves to a fresh buffer
/// with room for the next read instead. Split the usual
/// way, the frame would share its buffer with the bytes after it, so a
/// receiver that wants it mutable (to decrypt in place) would have to copy
/// the whole frame.
fn take_frame(src: &mut BytesMut, len: usize, max_read_chunk: usize) -> BytesMut {
    let past = src.len() - len;
    if len >= LARGE_FRAME && past <= max_read_chunk.max(len / 8) {
        // Room for the next read, as upstream's headroom gave it.
        let mut rest = BytesMut::with_capacity(max_read_chunk.max(past));
        rest.extend_from_slice(&src[len..]);
        src.truncate(len);
        std::mem::replace(src, rest)
    } else {
        src.split_to(len)
    }
}

fn encode_frame(frame: &Bytes, dst: &mut BytesMut, more: bool) {
    dst.reserve(frame.len() + 9);
    encode_frame_header(frame.len(), dst, more);
    dst.extend_from_slice(frame.as_ref());
}

/// ots patch: a message frame's header (flags and length) alone, for the
/// write half that sends large frames from where they are.
pub(crate) fn encode_frame_header(len: usize, dst: &mut BytesMut, more: bool) {
    let mut flags: u8 = 0;
    if more {
        flags |= 0b0000_0001;
    }
    if len > 255 {
        flags |= 0b0000_0010;
        let mut header = [0u8; 9];
        header[0] = flags;
        header[1..].copy_from_slice(&(len as u64).to_be_bytes());
        dst.extend_from_slice(&header);
    } else {
        dst.extend_from_slice(&[flags, len as u8]);
    }
}

impl Encoder for ZmqCodec {
    type Error = CodecError;
    type Item<'a> = Message;

    fn encode(&mut self, message: Self::Item<'_>, dst: &mut BytesMut) -> Result<(), Self::Error> {
        match message {
            Message::Greeting(payload) => dst.unsplit(payload.into()),
            Message::Command(command) => dst.unsplit(command.into()),
            Message::Message(message) => {
                let last_element = message.len() - 1;
                for (idx, part) in message.iter().enumerate() {
                    encode_frame(part, dst, idx != last_element);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    mod multipart;
    mod read_buffer;

    use super::*;

    fn limited(max_size: usize, max_frames: usize) -> ZmqCodec {
        let mut options = SocketOptions::default();
        options
            .max_message_size(max_size)
            .max_message_frames(max_frames);
        let mut codec = ZmqCodec::with_options(&options);
        codec.waiting_for = 1;
        codec.state = DecoderState::FrameHeader;
        codec
    }

    #[test]
    pub fn ots_long_frame_header_over_the_limit_is_refused_before_allocating() {
        for declared in [1u64 << 40, 1 << 50, 1 << 62, u64::MAX, 1025] {
            let mut codec = limited(1024, 8);
            let mut bytes = BytesMut::new();
            bytes.extend_from_slice(&[0x02]);
            bytes.extend_from_slice(&declared.to_be_bytes());
            assert!(codec.decode(&mut bytes).is_err(), "declared {declared}");
            assert!(bytes.capacity() < 4096, "declared {declared}");
        }
    }

    #[test]
    pub fn ots_message_size_counts_every_frame() {
        let mut codec = limited(300, 8);
        let mut bytes = BytesMut::new();
        // Two 200-byte frames: each under the limit, together over it.
        for more in [true, false] {
            bytes.extend_from_slice(&[0x02 | u8::from(more)]);
            bytes.extend_from_slice(&200u64.to_be_bytes());
            bytes.extend_from_slice(&[7u8; 200]);
        }
        assert!(codec.decode(&mut bytes).is_err());
    }

    #[test]
    pub fn ots_frame_count_is_bounded_and_limits_reset_per_message() {
        let mut codec = limited(1024, 3);
        let mut bytes = BytesMut::new();
        for _ in 0..2 {
            bytes.extend_from_slice(&[0x01, 1, b'a', 0x01, 1, b'b', 0x00, 1, b'c']);
        }
        for _ in 0..2 {
            match codec.decode(&mut bytes) {
                Ok(Some(Message::Message(m))) => assert_eq!(m.len(), 3),
                other => panic!("expected a message, got {other:?}"),
            }
        }
        bytes.extend_from_slice(&[0x01, 0, 0x01, 0, 0x01, 0, 0x00, 0]);
        assert!(codec.decode(&mut bytes).is_err());
    }

    #[test]
    pub fn test_message_decode_1() {
        let data = "01093c4944537c4d53473e01403239386166316563653932306635373637656132393438376261363164643436613534636334313262653032303339316139653831636535633234383039653001cb7b226d73675f6964223a2236356336396230312d636634622d343563322d616165612d323263306365326531316533222c2273657373696f6e223a2230326462356631642d386535632d346464612d383064342d303337363835343465616138222c22757365726e616d65223a223c544f444f3e222c2264617465223a22323032312d31322d32395430343a35393a33392e3539333533372b30303a3030222c226d73675f74797065223a22657865637574655f7265706c79222c2276657273696f6e223a22352e33227d01c07b226d73675f6964223a223965303336313036373262393433393961343432316539373330333330326162222c2273657373696f6e223a226231323139393364663235613432643839376135653163383362306337616665222c22757365726e616d65223a22757365726e616d65222c2264617465223a22313937302d30312d30315430303a30303a30302b30303a3030222c226d73675f74797065223a22657865637574655f72657175657374222c2276657273696f6e223a22352e32227d01027b7d00467b22737461747573223a226f6b222c22657865637574696f6e5f636f756e74223a312c227061796c6f6164223a5b5d2c22757365725f65787072657373696f6e73223a7b7d7d";
        let hex_data = hex::decode(data).unwrap();
        let mut bytes = BytesMut::from(hex_data.as_slice());
        let mut codec = ZmqCodec::new();
        codec.waiting_for = 1;
        codec.state = DecoderState::FrameHeader;

        let message = codec
            .decode(&mut bytes)
            .expect("decode success")
            .expect("single message");

        eprintln!("{:?}", message);
        match message {
            Message::Message(m) => {
                assert_eq!(6, m.into_vecdeque().len());
            }
            _ => panic!("wrong message type"),
        }
        assert_eq!(bytes.len(), 0);
    }

    #[test]
    pub fn test_message_decode_2() {
        let data = "01093c4944537c4d53473e01406139346435366530343438353335303831316561623063663730623464356366373933653431653838616330666339646263346562326238616136643635306601cb7b226d73675f6964223a2263383466623933372d333162662d346335622d386430392d386535633230633434333636222c2273657373696f6e223a2230326462356631642d386535632d346464612d383064342d303337363835343465616138222c22757365726e616d65223a223c544f444f3e222c2264617465223a22323032312d31322d32395430343a35393a34332e3037343831332b30303a3030222c226d73675f74797065223a22657865637574655f7265706c79222c2276657273696f6e223a22352e33227d01c07b226d73675f6964223a223238646635316334303933313433643339393131346664333439643530396634222c2273657373696f6e223a226231323139393364663235613432643839376135653163383362306337616665222c22757365726e616d65223a22757365726e616d65222c2264617465223a22313937302d30312d30315430303a30303a30302b30303a3030222c226d73675f74797065223a22657865637574655f72657175657374222c2276657273696f6e223a22352e32227d01027b7d00467b22737461747573223a226f6b222c22657865637574696f6e5f636f756e74223a322c227061796c6f6164223a5b5d2c22757365725f65787072657373696f6e73223a7b7d7d";
        let hex_data = hex::decode(data).unwrap();
        let mut bytes = BytesMut::from(hex_data.as_slice());
        let mut codec = ZmqCodec::new();
        codec.waiting_for = 1;
        codec.state = DecoderState::FrameHeader;

        let message = codec
            .decode(&mut bytes)
            .expect("decode success")
            .expect("single message");
        eprintln!("{:?}", message);
        assert_eq!(bytes.len(), 0);
        match message {
            Message::Message(m) => {
                assert_eq!(6, m.into_vecdeque().len());
            }
            _ => panic!("wrong message type"),
        }
    }
}
