//! Masked client frames (RFC 6455 §5.2) written byte by byte, for the suites
//! that send what a client library would never send.

#![allow(dead_code)] // each test binary uses a different part

const MASK: [u8; 4] = [0x5a, 0x13, 0xc7, 0x2e];

/// A masked client frame: `first` is the FIN/RSV/opcode byte.
pub fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = header(first, payload.len() as u64);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    out
}

/// The header of a masked client frame announcing `len` payload bytes.
pub fn header(first: u8, len: u64) -> Vec<u8> {
    let mut out = vec![first];
    match len {
        0..=125 => out.push(0x80 | len as u8),
        126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0x80 | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    out
}

/// A frame without the mask a client must set (RFC 6455 §5.1).
pub fn unmasked(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() <= 125);
    let mut out = vec![first, payload.len() as u8];
    out.extend_from_slice(payload);
    out
}

/// A whole text message in one frame.
pub fn text(s: impl AsRef<[u8]>) -> Vec<u8> {
    frame(0x81, s.as_ref())
}

/// First fragment of a text message, a middle fragment, the last fragment.
pub fn text_start(s: impl AsRef<[u8]>) -> Vec<u8> {
    frame(0x01, s.as_ref())
}

pub fn cont(s: impl AsRef<[u8]>) -> Vec<u8> {
    frame(0x00, s.as_ref())
}

pub fn cont_fin(s: impl AsRef<[u8]>) -> Vec<u8> {
    frame(0x80, s.as_ref())
}

pub fn ping_frame(payload: &[u8]) -> Vec<u8> {
    frame(0x89, payload)
}

/// A close frame with `code` and `reason` bytes (which need not be UTF-8).
pub fn close_frame(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    frame(0x88, &payload)
}

pub fn pong_frame(payload: &[u8]) -> Vec<u8> {
    frame(0x8a, payload)
}
