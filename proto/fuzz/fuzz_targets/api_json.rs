//! serde JSON decoding of the local API's answer types.
//!
//! Checks: `serde_json::from_slice` never panics for `ErrorBody`, `PutObjectResponse` or
//! `StatusResponse`; a value that decodes survives a JSON round trip unchanged.
#![no_main]

use cachemesh_proto::api::{ErrorBody, PutObjectResponse, StatusResponse};
use libfuzzer_sys::fuzz_target;

macro_rules! check {
    ($ty:ty, $data:expr) => {
        if let Ok(value) = serde_json::from_slice::<$ty>($data) {
            let json = serde_json::to_vec(&value).expect("a decoded value must serialize");
            let again: $ty = serde_json::from_slice(&json).expect("serialized value must decode");
            assert_eq!(again, value, "JSON round trip changed the value");
        }
    };
}

fuzz_target!(|data: &[u8]| {
    check!(ErrorBody, data);
    check!(PutObjectResponse, data);
    check!(StatusResponse, data);
});
