//! Arbitrary bytes, split into frames, through the codec: decoding must
//! never panic, and whatever decodes is within every documented limit and
//! encodes back to something that decodes to the same message.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte: how many frames; then frames split at 0xff bytes.
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let frames: Vec<Bytes> = rest
        .split(|b| *b == 0xff)
        .take(usize::from(count % 5))
        .map(Bytes::copy_from_slice)
        .collect();
    if let Ok(env) = ots::protocol::decode(frames) {
        assert!(ots::protocol::check::check(&env).is_ok());
        let again = ots::protocol::decode(ots::protocol::encode(&env.header, &env.body, env.raw.clone()))
            .expect("what decoded re-encodes");
        assert_eq!(again.body, env.body);
    }
});
