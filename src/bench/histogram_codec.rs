//! A series' HDR histogram in the bench JSON: HdrHistogram's compressed V2
//! encoding (the one its Java, Go and Rust implementations all read), in
//! base64 — so runs can be merged and re-plotted, and percentiles recomputed
//! rather than copied.

use std::io::Cursor;

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2DeflateSerializeError, V2DeflateSerializer};
use hdrhistogram::Histogram;

/// Encoding or decoding a histogram failed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Failed to encode the histogram.
    #[error("cannot encode the histogram")]
    Encode(#[source] V2DeflateSerializeError),
    /// The text is not base64.
    #[error("the histogram is not valid base64")]
    Base64(#[source] base64::DecodeError),
    /// The bytes are not an HdrHistogram V2 (compressed or not).
    #[error("the histogram is not an HdrHistogram V2 encoding")]
    Decode(#[source] hdrhistogram::serialization::DeserializeError),
}

/// `h` as base64 of its compressed V2 encoding.
pub fn encode(h: &Histogram<u64>) -> Result<String, CodecError> {
    let mut bytes = Vec::new();
    V2DeflateSerializer::new().serialize(h, &mut bytes).map_err(CodecError::Encode)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The histogram [`encode`] wrote (plain V2 is read too).
pub fn decode(text: &str) -> Result<Histogram<u64>, CodecError> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(text.trim()).map_err(CodecError::Base64)?;
    let mut h: Histogram<u64> = Deserializer::new().deserialize(&mut Cursor::new(bytes)).map_err(CodecError::Decode)?;
    // Merging runs adds histograms of other ranges.
    h.auto(true);
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_percentile() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        h.auto(true);
        // A long tail, as latencies have: 1000 cycles and a few of 10^6.
        for i in 0..50_000u64 {
            h.record(1000 + i % 977).unwrap();
        }
        for i in 0..50u64 {
            h.record(1_000_000 + i * 10_007).unwrap();
        }
        let back = decode(&encode(&h).unwrap()).unwrap();
        assert_eq!(back.len(), h.len());
        for q in [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0] {
            assert_eq!(back.value_at_quantile(q), h.value_at_quantile(q), "quantile {q}");
        }
        assert_eq!((back.min(), back.max()), (h.min(), h.max()));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(decode("not base64!"), Err(CodecError::Base64(_))));
        assert!(matches!(decode("aGVsbG8gd29ybGQ="), Err(CodecError::Decode(_))));
    }
}
