//! Data-plane frame decoders (`Hello`, `Request`, `ResponseHead`) on arbitrary bytes.
//!
//! Checks: no decoder panics; a decoded frame re-encodes to exactly the bytes it consumed
//! (error messages excepted when longer than the limit, which encode truncates); a frame
//! never claims to consume more bytes than it was given.
#![no_main]

use cachemesh_proto::frames::{Hello, Request, ResponseHead};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((request, used))) = Request::decode(data) {
        assert!(used <= data.len());
        assert_eq!(request.encode(), &data[..used]);
    }
    if let Ok(Some((head, used))) = ResponseHead::decode(data) {
        assert!(used <= data.len());
        assert_eq!(head.encode(), &data[..used]);
    }
    if let Ok(Some((hello, used))) = Hello::decode(data) {
        assert!(used <= data.len());
        assert_eq!(hello.encode(), &data[..used]);
    }
});
