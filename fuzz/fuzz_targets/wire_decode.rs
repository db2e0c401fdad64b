//! Arbitrary bytes as a packet on the broker's socket, in both directions.
//!
//! - `decode_request` and `decode_response` never panic (they validate with
//!   bytecheck before touching the archive);
//! - whatever they accept re-encodes, and the re-encoded bytes decode to the
//!   same value (so an accepted packet has one meaning).

#![no_main]

use libfuzzer_sys::fuzz_target;
use shm_layout::wire::{decode_request, decode_response, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = decode_request(data) {
        let bytes = encode(&request);
        let again = decode_request(&bytes).expect("a re-encoded request decodes");
        assert_eq!(again, request, "a request changed through encode/decode");
    }
    if let Ok(response) = decode_response(data) {
        let bytes = encode(&response);
        let again = decode_response(&bytes).expect("a re-encoded response decodes");
        assert_eq!(again, response, "a response changed through encode/decode");
    }
});
