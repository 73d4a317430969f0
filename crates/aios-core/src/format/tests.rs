use std::collections::BTreeMap;

use super::*;
use crate::error::Error;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_sample(path: &std::path::Path) {
    let a = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let b = f32_bytes(&[7.0]);
    let meta = BTreeMap::from([(KEY_CONFIG.to_string(), "{\"x\":1}".to_string())]);
    write_weight_file(
        path,
        "model",
        &meta,
        &[
            TensorToWrite { name: "a", dtype: DType::F32, shape: &[2, 3], data: &a },
            TensorToWrite { name: "b", dtype: DType::F32, shape: &[], data: &b },
        ],
    )
    .unwrap();
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.parquet");
    write_sample(&p);
    let f = WeightFile::open(&p).unwrap();
    assert_eq!(f.kind, "model");
    assert_eq!(f.format_version, FORMAT_VERSION);
    assert_eq!(f.config_json(), Some("{\"x\":1}"));
    let a = f.require("a").unwrap();
    assert_eq!(a.shape, vec![2, 3]);
    assert_eq!(a.data(), f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).as_slice());
    assert_eq!(f.require("b").unwrap().shape, Vec::<usize>::new());
    assert!(matches!(f.require("zzz"), Err(Error::Format { .. })));
}

#[test]
fn writer_rejects_bad_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.parquet");
    let d = f32_bytes(&[1.0, 2.0]);
    let wrong_len = [TensorToWrite { name: "a", dtype: DType::F32, shape: &[3], data: &d }];
    assert!(matches!(write_weight_file(&p, "model", &BTreeMap::new(), &wrong_len), Err(Error::Input(_))));
    let dup = [
        TensorToWrite { name: "a", dtype: DType::F32, shape: &[2], data: &d },
        TensorToWrite { name: "a", dtype: DType::F32, shape: &[2], data: &d },
    ];
    assert!(matches!(write_weight_file(&p, "model", &BTreeMap::new(), &dup), Err(Error::Input(_))));
    assert!(!p.exists(), "a refused write must not leave a file");
}

#[test]
fn truncated_and_garbage_files_are_format_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.parquet");
    write_sample(&p);
    let full = std::fs::read(&p).unwrap();
    let q = dir.path().join("bad.parquet");
    for cut in [0, 5, 11, full.len() / 2, full.len() - 1] {
        std::fs::write(&q, &full[..cut]).unwrap();
        let e = WeightFile::open(&q).unwrap_err();
        assert!(matches!(e, Error::Format { .. }), "cut {cut}: {e}");
    }
    std::fs::write(&q, b"definitely not a parquet file at all").unwrap();
    assert!(matches!(WeightFile::open(&q), Err(Error::Format { .. })));
    assert!(matches!(WeightFile::open(dir.path().join("missing.parquet")), Err(Error::Io { .. })));
}

/// Flipping any single byte must give either a valid file or a clean error,
/// never a panic or abort.
#[test]
fn byte_flips_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.parquet");
    write_sample(&p);
    let full = std::fs::read(&p).unwrap();
    let q = dir.path().join("flip.parquet");
    for i in 0..full.len() {
        let mut b = full.clone();
        b[i] ^= 0x5a;
        std::fs::write(&q, &b).unwrap();
        let _ = WeightFile::open(&q);
    }
}

/// A flipped bit anywhere in a tensor's data is detected and the tensor named.
#[test]
fn every_tensor_byte_is_checksummed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.parquet");
    write_sample(&p);
    let full = std::fs::read(&p).unwrap();
    let a = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let at = full.windows(a.len()).position(|w| w == a.as_slice()).expect("tensor a is stored verbatim");
    let q = dir.path().join("flip.parquet");
    for i in at..at + a.len() {
        for bit in 0..8 {
            let mut b = full.clone();
            b[i] ^= 1 << bit;
            std::fs::write(&q, &b).unwrap();
            let e = WeightFile::open(&q).unwrap_err();
            assert!(e.to_string().contains("tensor \"a\" is damaged"), "byte {i} bit {bit}: {e}");
        }
    }
}

#[test]
fn parquet_magic_is_checked_at_both_ends() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.parquet");
    write_sample(&p);
    let full = std::fs::read(&p).unwrap();
    for at in [0, 3, full.len() - 4, full.len() - 1] {
        let mut b = full.clone();
        b[at] ^= 0x20;
        std::fs::write(&p, &b).unwrap();
        let e = WeightFile::open(&p).unwrap_err();
        assert!(e.to_string().contains("PAR1"), "byte {at}: {e}");
    }
}

#[test]
fn checksums_must_cover_every_tensor_its_dtype_and_shape() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.parquet");
    write_sample(&p);
    let f = WeightFile::open(&p).unwrap();
    let good: serde_json::Value = serde_json::from_str(&f.metadata[KEY_CHECKSUMS]).unwrap();
    assert_eq!(good["a"]["shape"], serde_json::json!([2, 3]));
    let edited = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        edit(&mut v);
        v.to_string()
    };
    let bad = [
        "{}".to_string(),
        "[1]".to_string(),
        edited(&|v| v["a"]["shape"] = serde_json::json!([3, 2])),
        edited(&|v| v["a"]["dtype"] = serde_json::json!("bf16")),
        edited(&|v| v["a"]["crc32"] = serde_json::json!("zz")),
        edited(&|v| v["c"] = v["b"].clone()),
        edited(&|v| v["a"]["extra"] = serde_json::json!(1)),
    ];
    for json in bad {
        let err = super::read::verify_checksums("w", &json, &f.tensors).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{json}: {err}");
    }
    super::read::verify_checksums("w", &good.to_string(), &f.tensors).unwrap();
}

/// A damaged checksum key cannot pass for a file written before checksums:
/// this format version requires it.
#[test]
fn a_damaged_checksum_key_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.parquet");
    write_sample(&p);
    let mut bytes = std::fs::read(&p).unwrap();
    let at = bytes.windows(KEY_CHECKSUMS.len()).position(|w| w == KEY_CHECKSUMS.as_bytes()).unwrap();
    bytes[at + KEY_CHECKSUMS.len() - 1] ^= 0x01; // "aios.checksums" -> "aios.checksumr"
    std::fs::write(&p, &bytes).unwrap();
    let err = WeightFile::open(&p).unwrap_err();
    assert!(err.to_string().contains("requires aios.checksums"), "{err}");
}

/// A file that makes the parquet decoder panic (found by the fuzzer, kept in
/// tests/fixtures): a format error, through the silent guard.
#[test]
fn a_decoder_panic_is_a_format_error() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parquet-decoder-panic.parquet");
    let before = crate::guard::silenced();
    let err = WeightFile::open(&path).unwrap_err();
    assert!(err.to_string().contains("decoder rejected"), "{err}");
    assert!(crate::guard::silenced() > before, "the fixture no longer reaches a decoder panic");
}
