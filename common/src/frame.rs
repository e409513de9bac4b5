//! Length-delimited, versioned postcard frames.
//!
//! A frame is `u32 BE length` then `u16 BE protocol version` then the postcard
//! body. Decoding never panics: a short, oversized, wrong-version or
//! malformed frame, or one with bytes left over, is a [`FrameError`].

use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::PROTOCOL_VERSION;

/// Largest frame either side accepts (1 MiB): bigger payloads are split by the sender.
pub const MAX_FRAME_LEN: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is larger than the {max} bytes allowed")]
    TooLarge { len: usize, max: usize },
    #[error("frame of {0} bytes is too short to hold a header")]
    TooShort(usize),
    #[error(
        "peer speaks protocol version {got}, this build speaks {PROTOCOL_VERSION}: upgrade the older side"
    )]
    Version { got: u16 },
    #[error("malformed frame body")]
    Malformed(#[source] postcard::Error),
    #[error("frame body has {0} trailing bytes")]
    Trailing(usize),
    #[error("could not encode frame")]
    Encode(#[source] postcard::Error),
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("stream i/o failed")]
    Io(#[source] std::io::Error),
}

/// The frame body (version + postcard) of `msg`, without the length prefix.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = PROTOCOL_VERSION.to_be_bytes().to_vec();
    let body = postcard::to_stdvec(msg).map_err(FrameError::Encode)?;
    out.extend_from_slice(&body);
    if out.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: out.len(),
            max: MAX_FRAME_LEN,
        });
    }
    Ok(out)
}

/// Decodes a frame body made by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    let (version, body) = match bytes {
        [a, b, rest @ ..] => (u16::from_be_bytes([*a, *b]), rest),
        _ => return Err(FrameError::TooShort(bytes.len())),
    };
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version { got: version });
    }
    let (msg, rest) = postcard::take_from_bytes(body).map_err(FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len()));
    }
    Ok(msg)
}

/// Appends `msg` to `buf` as one whole frame (length, version, body).
fn append_frame<T: Serialize>(buf: &mut Vec<u8>, msg: &T) -> Result<(), FrameError> {
    let body = encode(msg)?;
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
        len: body.len(),
        max: MAX_FRAME_LEN,
    })?;
    buf.reserve(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    Ok(())
}

/// Writes one frame.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    write_frames(w, std::slice::from_ref(msg)).await
}

/// Writes `msgs` as consecutive frames in one write, so that QUIC sends
/// them in as few packets as they fit (an agent's `Started` and
/// `Finished` of a quick step, the controller's acknowledgements of them):
/// the reader sees the same frames as from one [`write_frame`] each.
pub async fn write_frames<W, T>(w: &mut W, msgs: &[T]) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let mut buf = Vec::new();
    for msg in msgs {
        append_frame(&mut buf, msg)?;
    }
    w.write_all(&buf).await.map_err(FrameError::Io)?;
    w.flush().await.map_err(FrameError::Io)
}

/// Reads frames through a buffer that holds only what arrived and was not
/// read yet (nothing while the stream is idle, unlike a `BufReader`'s fixed
/// buffer: 10,000 agents keep 40,000 work streams open), so that a reader
/// can tell the frames that arrived together ([`FrameReader::holds_frame`])
/// and take them as one batch.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
}

/// Bytes a reader waits for the peer with: they live in its future while
/// the stream is idle, so they are few.
const WAIT_CHUNK: usize = 64;
/// Bytes taken at a time from what has arrived already.
const READY_CHUNK: usize = 8 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: Vec::new(),
        }
    }

    /// Whether a whole frame has arrived already: [`FrameReader::next`]
    /// then returns without waiting for the peer.
    pub fn holds_frame(&self) -> bool {
        holds_frame(&self.buf)
    }

    /// The next frame, as [`read_frame`] reads it; `Ok(None)` when the
    /// stream ended cleanly before a frame began.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        loop {
            if let [a, b, c, d, rest @ ..] = self.buf.as_slice() {
                let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
                if len > MAX_FRAME_LEN {
                    return Err(FrameError::TooLarge {
                        len,
                        max: MAX_FRAME_LEN,
                    });
                }
                if rest.len() >= len {
                    let msg = decode(&rest[..len]);
                    self.buf.drain(..4 + len);
                    if self.buf.is_empty() {
                        // An idle stream holds no buffer.
                        self.buf = Vec::new();
                    }
                    return msg.map(Some);
                }
            }
            let mut first = [0u8; WAIT_CHUNK];
            let n = self.inner.read(&mut first).await.map_err(FrameError::Io)?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
            self.buf.extend_from_slice(&first[..n]);
            self.take_ready()?;
        }
    }

    /// Moves into the buffer what has arrived already, without waiting
    /// (polled once with a waker that does nothing: the next wait polls
    /// again with the task's own). At most a frame's worth past a whole
    /// frame; the end of the stream shows at the next read.
    fn take_ready(&mut self) -> Result<(), FrameError> {
        use std::task::{Context, Poll, Waker};
        let mut chunk = [0u8; READY_CHUNK];
        let mut cx = Context::from_waker(Waker::noop());
        while self.buf.len() < 2 * MAX_FRAME_LEN {
            let mut out = tokio::io::ReadBuf::new(&mut chunk);
            match std::pin::Pin::new(&mut self.inner).poll_read(&mut cx, &mut out) {
                Poll::Ready(Ok(())) if !out.filled().is_empty() => {
                    self.buf.extend_from_slice(out.filled())
                }
                Poll::Ready(Ok(())) | Poll::Pending => return Ok(()),
                Poll::Ready(Err(e)) => return Err(FrameError::Io(e)),
            }
        }
        Ok(())
    }

    /// The stream, to hand on (any bytes read and not taken are dropped).
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Whether `buffered`, the bytes a reader holds already, begins with a
/// whole frame: reading it then completes without waiting for the peer.
fn holds_frame(buffered: &[u8]) -> bool {
    match buffered {
        [a, b, c, d, rest @ ..] => {
            let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
            // An oversized length is read at once too: into its error.
            len > MAX_FRAME_LEN || rest.len() >= len
        }
        _ => false,
    }
}

/// Reads one frame; `Ok(None)` when the stream ended cleanly before a frame began.
pub async fn read_frame<R, T>(r: &mut R) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await.map_err(FrameError::Io)?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    decode(&body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AgentMsg, EnrollClientMsg, Heartbeat};
    use crate::{ComponentStatus, Usage};

    fn heartbeat() -> AgentMsg {
        AgentMsg::Heartbeat(Heartbeat {
            usage: Usage {
                cpu_pct: 12.5,
                mem_pct: 40.0,
                disk_pct: 7.0,
            },
            components: vec![ComponentStatus {
                name: "nats".into(),
                status: "RUNNING".into(),
                pid: Some(42),
                cpu_pct: Some(0.5),
                mem_kb: Some(2048),
            }],
        })
    }

    /// Frames written together read back one by one, and a frame reader
    /// can tell a whole frame waiting from a partial one, holding nothing
    /// once all is read.
    #[tokio::test]
    async fn frames_written_together_read_back_one_by_one() {
        let msgs = vec![heartbeat(), heartbeat(), heartbeat()];
        let mut wire = Vec::new();
        write_frames(&mut wire, &msgs).await.expect("write");
        let mut one = Vec::new();
        write_frame(&mut one, &heartbeat()).await.expect("write");
        assert_eq!(wire.len(), 3 * one.len(), "the same bytes as three writes");
        let mut r = FrameReader::new(&wire[..]);
        assert!(!r.holds_frame(), "nothing read yet");
        for left in [2, 1, 0] {
            let got: Option<AgentMsg> = r.next().await.expect("frame");
            assert_eq!(got, Some(heartbeat()));
            assert_eq!(r.holds_frame(), left > 0, "{left} whole frames left");
        }
        assert!(r.next::<AgentMsg>().await.expect("end").is_none());
        assert_eq!(
            r.buf.capacity(),
            0,
            "a reader with nothing left holds no buffer"
        );
        // All but the last byte arrives: two whole frames, then a part.
        let mut r = FrameReader::new(&wire[..wire.len() - 1]);
        for _ in 0..2 {
            assert_eq!(
                r.next::<AgentMsg>().await.expect("frame"),
                Some(heartbeat())
            );
        }
        assert!(!r.holds_frame(), "the third is not whole");
        assert!(matches!(
            r.next::<AgentMsg>().await,
            Err(FrameError::Truncated)
        ));
        assert!(!holds_frame(&[0, 0]), "nor is half a length");
        assert!(
            holds_frame(&[0xff, 0xff, 0xff, 0xff]),
            "an oversized one errs at once"
        );
        let mut r = FrameReader::new(&[0xffu8, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            r.next::<AgentMsg>().await,
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn frames_round_trip_over_a_stream() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let sent = heartbeat();
        let writer = tokio::spawn(async move {
            write_frame(&mut a, &heartbeat()).await?;
            write_frame(&mut a, &EnrollClientMsg::Confirm { mac: vec![7; 32] }).await
        });
        let got: Option<AgentMsg> = read_frame(&mut b).await.expect("first frame");
        assert_eq!(got, Some(sent));
        let got: Option<EnrollClientMsg> = read_frame(&mut b).await.expect("second frame");
        assert_eq!(got, Some(EnrollClientMsg::Confirm { mac: vec![7; 32] }));
        writer.await.expect("join").expect("write");
        let end: Option<AgentMsg> = read_frame(&mut b).await.expect("clean end");
        assert_eq!(end, None);
    }

    #[test]
    fn wrong_version_and_trailing_bytes_are_named() {
        let mut body = encode(&heartbeat()).expect("encode");
        body[1] = 9;
        assert!(matches!(
            decode::<AgentMsg>(&body),
            Err(FrameError::Version { got: 9 })
        ));
        let mut body = encode(&heartbeat()).expect("encode");
        body.push(0);
        assert!(matches!(
            decode::<AgentMsg>(&body),
            Err(FrameError::Trailing(1))
        ));
    }

    #[test]
    fn no_byte_string_makes_decoding_panic() {
        // Every prefix of a valid frame, and pseudo-random garbage, decode to errors or values, never a panic.
        let body = encode(&heartbeat()).expect("encode");
        for end in 0..body.len() {
            assert!(
                decode::<AgentMsg>(&body[..end]).is_err(),
                "prefix {end} decoded"
            );
        }
        let mut x: u32 = 0x1234_5678;
        for len in 0..512 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x & 0xff) as u8
                })
                .collect();
            let mut framed = PROTOCOL_VERSION.to_be_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            let _ = decode::<AgentMsg>(&framed);
            let _ = decode::<EnrollClientMsg>(&framed);
        }
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            let _ = a.write_all(&(u32::MAX).to_be_bytes()).await;
        });
        assert!(matches!(
            read_frame::<_, AgentMsg>(&mut b).await,
            Err(FrameError::TooLarge { .. })
        ));
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            let _ = a.write_all(&[0, 0, 0, 10, 0, 1, 2]).await;
        });
        assert!(matches!(
            read_frame::<_, AgentMsg>(&mut b).await,
            Err(FrameError::Truncated)
        ));
    }
}
