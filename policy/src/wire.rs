//! The helper's wire: length-prefixed JSON frames (u32 big-endian length, then the JSON)
//! over the socketpair bangerd hands the helper as its stdin.

use std::io::{self, Read, Write};

use serde::{Serialize, de::DeserializeOwned};

/// Largest frame either side accepts: requests and answers are small.
pub const MAX_FRAME: u32 = 64 * 1024;

/// Write one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "helper frame too large"))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    w.flush()
}

/// Read one frame; `Ok(None)` at a clean end of stream (between frames).
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("helper frame of {len} bytes exceeds {MAX_FRAME}"),
        ));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &vec![1, 2, 3]).unwrap();
        let back: Option<Vec<i32>> = read_frame(&mut buf.as_slice()).unwrap();
        assert_eq!(back, Some(vec![1, 2, 3]));
        let empty: Option<Vec<i32>> = read_frame(&mut &b""[..]).unwrap();
        assert_eq!(empty, None);
        let mut huge = (MAX_FRAME + 1).to_be_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        let err = read_frame::<serde_json::Value>(&mut huge.as_slice()).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
        let truncated = [0u8, 0, 0, 10, b'{'];
        assert!(read_frame::<serde_json::Value>(&mut &truncated[..]).is_err());
    }
}
