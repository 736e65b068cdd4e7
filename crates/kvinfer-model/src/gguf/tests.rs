use super::*;

fn sample() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::Str("llama".into()))
        .meta("llama.block_count", MetaValue::U32(2))
        .meta("x.f", MetaValue::F32(0.5))
        .meta("x.flag", MetaValue::Bool(true))
        .meta(
            "tok.list",
            MetaValue::Array(vec![
                MetaValue::Str("a".into()),
                MetaValue::Str("bé".into()),
            ]),
        )
        .meta(
            "x.scores",
            MetaValue::Array(vec![MetaValue::F32(1.0), MetaValue::F32(-2.0)]),
        );
    w.tensor_f32("t.a", &[4, 2], &[1., 2., 3., 4., 5., 6., 7., 8.]);
    w.tensor_f32("t.b", &[3], &[9., 10., 11.]);
    w
}

fn write_tmp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvinfer-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn round_trip() {
    let p = write_tmp("ok.gguf", &sample().to_bytes());
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.get_str("general.architecture"), Some("llama"));
    assert_eq!(f.get_u32("llama.block_count"), Some(2));
    assert_eq!(f.get_f32("x.f"), Some(0.5));
    assert_eq!(f.get_bool("x.flag"), Some(true));
    assert_eq!(f.get_str_array("tok.list").unwrap(), vec!["a", "bé"]);
    assert_eq!(f.get_f32_array("x.scores").unwrap(), vec![1.0, -2.0]);
    assert_eq!(f.keys().len(), 6);
    let t = f.tensor("t.b").unwrap();
    assert_eq!(t.dims, vec![3]);
    assert_eq!(t.offset % 32, 0);
    let d = f.tensor_data(t);
    assert_eq!(f32::from_le_bytes(d[4..8].try_into().unwrap()), 10.0);
    assert_eq!(f.tensor("t.a").unwrap().num_elements(), 8);
    assert!(f.tensor("missing").is_none());
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let bytes = sample().to_bytes();
    for cut in 0..bytes.len() - 1 {
        let p = write_tmp("cut.gguf", &bytes[..cut]);
        match GgufFile::open(&p) {
            Err(GgufError::Truncated { .. }) | Err(GgufError::BadMagic(_)) => {}
            Err(e) => panic!("cut at {cut}: unexpected error {e}"),
            Ok(_) if cut + 32 > bytes.len() => {} // only padding after the last tensor was cut
            Ok(_) => panic!("cut at {cut} of {} parsed", bytes.len()),
        }
    }
}

#[test]
fn bad_magic_version_and_types() {
    let mut bytes = sample().to_bytes();
    bytes[0] = b'X';
    let e = GgufFile::open(&write_tmp("magic.gguf", &bytes))
        .err()
        .unwrap();
    assert!(matches!(e, GgufError::BadMagic(_)), "{e}");

    let mut bytes = sample().to_bytes();
    bytes[4] = 9;
    let e = GgufFile::open(&write_tmp("ver.gguf", &bytes))
        .err()
        .unwrap();
    assert!(matches!(e, GgufError::UnsupportedVersion(9)), "{e}");

    let mut w = GgufWriter::new();
    w.tensor("q", &[32], GgmlType::Q8_0, vec![0; 34]);
    let mut bytes = w.to_bytes();
    // the tensor type id sits 12 bytes before the end of the tensor info (type u32 + offset u64)
    let info_end = 24 + 8 + 1 + 4 + 8 + 4 + 8;
    bytes[info_end - 12] = 99;
    let e = GgufFile::open(&write_tmp("type.gguf", &bytes))
        .err()
        .unwrap();
    assert!(
        matches!(e, GgufError::UnsupportedTensorType { type_id: 99, .. }),
        "{e}"
    );
    // A known ggml type kvinfer does not run is named.
    for (id, name) in [(16u8, "IQ2_XXS"), (21, "IQ3_S")] {
        bytes[info_end - 12] = id;
        let e = GgufFile::open(&write_tmp("type.gguf", &bytes))
            .err()
            .unwrap();
        assert!(e.to_string().contains(&format!("type {name} ")), "{e}");
        // The types it does run, from the one list.
        assert!(
            e.to_string()
                .contains("Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, BF16)"),
            "{e}"
        );
    }

    let mut bytes = sample().to_bytes();
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // absurd tensor count
    let e = GgufFile::open(&write_tmp("count.gguf", &bytes))
        .err()
        .unwrap();
    assert!(matches!(e, GgufError::Malformed(_)), "{e}");

    let e = GgufFile::open(Path::new("/nonexistent/model.gguf"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("/nonexistent/model.gguf"), "{e}");
}
