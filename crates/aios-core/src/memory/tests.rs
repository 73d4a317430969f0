use std::fs;

use super::manifest::Manifest;
use super::store::Query;
use super::*;
use crate::Error;

fn opts(dim: usize) -> StoreOptions {
    StoreOptions { dim: Some(dim), ..Default::default() }
}

/// Deterministic pseudo-random vectors (splitmix64).
fn vectors(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..n).map(|_| (0..dim).map(|_| next()).collect()).collect()
}

fn mem(text: &str, v: &[f32]) -> NewMemory {
    NewMemory { text: text.into(), meta: None, vector: Some(v.to_vec()) }
}

fn fill(store: &MemoryStore, vs: &[Vec<f32>]) -> Vec<u64> {
    store.add_many(vs.iter().enumerate().map(|(i, v)| mem(&format!("memory {i}"), v)).collect()).unwrap()
}

fn brute_force(vs: &[Vec<f32>], ids: &[u64], q: &[f32], k: usize) -> Vec<u64> {
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let qn = norm(q);
    let mut scored: Vec<(f32, u64)> = vs
        .iter()
        .zip(ids)
        .map(|(v, &id)| (v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>() / (norm(v) * qn), id))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(k).map(|s| s.1).collect()
}

#[test]
fn add_search_get_delete_compact_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let vs = vectors(500, 16, 1);
    let ids = {
        let store = MemoryStore::open(dir.path(), opts(16)).unwrap();
        let mut ids = fill(&store, &vs[..300]);
        for v in &vs[300..] {
            ids.push(store.add(mem("single", v)).unwrap());
        }
        assert_eq!(store.len(), 500);
        // Binary-counter merging keeps the segment count logarithmic.
        assert!(store.stats().segments <= 10, "{:?}", store.stats());
        ids
    };
    let store = MemoryStore::open(dir.path(), opts(16)).unwrap();
    assert_eq!(store.len(), 500);
    assert!(store.warnings().is_empty());
    let q = &vectors(1, 16, 99)[0];
    for k in [1, 5, 499, 500, 10_000] {
        let got: Vec<u64> =
            store.search(Query::Vector(q), k, Precision::F32, None).unwrap().iter().map(|h| h.id).collect();
        assert_eq!(got, brute_force(&vs, &ids, q, k), "k={k}");
    }
    // Each vector finds itself first, in both precisions.
    for i in [0, 123, 299, 300, 499] {
        for p in [Precision::F32, Precision::Int8] {
            let hits = store.search(Query::Vector(&vs[i]), 3, p, None).unwrap();
            assert_eq!(hits[0].id, ids[i]);
            assert!((hits[0].score - 1.0).abs() < 1e-5);
        }
    }
    store.delete(&[ids[0], ids[10]]).unwrap();
    assert_eq!(store.len(), 498);
    assert!(store.get(ids[0]).is_none());
    assert_eq!(store.get(ids[1]).unwrap().text, "memory 1");
    assert!(store.search(Query::Vector(&vs[0]), 500, Precision::F32, None).unwrap().iter().all(|h| h.id != ids[0]));
    assert!(matches!(store.delete(&[ids[0]]), Err(Error::Input(_))));
    assert!(matches!(store.delete(&[999_999]), Err(Error::Input(_))));
    assert_eq!(store.compact().unwrap(), 2);
    assert_eq!(store.stats().segments, 1);
    drop(store);
    let store = MemoryStore::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(store.len(), 498);
    assert_eq!(store.get(ids[1]).unwrap().text, "memory 1");
    assert_eq!(store.search(Query::Vector(&vs[42]), 1, Precision::F32, None).unwrap()[0].id, ids[42]);
    // Old segments stay while a retained (fall-back) manifest needs them;
    // two more versions later only the compacted segment is left.
    store.delete(&[ids[2]]).unwrap();
    store.delete(&[ids[3]]).unwrap();
    let segs = fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("seg-"))
        .count();
    assert_eq!(segs, 1);
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    // Duplicate vectors force score ties; ties break by id.
    let mut vs = vectors(9000, 8, 2);
    vs.extend(vs[..100].to_vec());
    fill(&MemoryStore::open(dir.path(), opts(8)).unwrap(), &vs);
    let q = &vectors(1, 8, 3)[0];
    let run = |threads| {
        let s = MemoryStore::open(
            dir.path(),
            StoreOptions { threads: Some(threads), read_only: true, ..Default::default() },
        )
        .unwrap();
        (
            s.search(Query::Vector(q), 50, Precision::F32, None).unwrap(),
            s.search(Query::Vector(q), 50, Precision::Int8, None).unwrap(),
        )
    };
    assert_eq!(run(1), run(2));
    assert_eq!(run(1), run(3));
}

#[test]
fn metadata_filter() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::open(dir.path(), opts(4)).unwrap();
    let vs = vectors(20, 4, 5);
    for (i, v) in vs.iter().enumerate() {
        let tag = if i % 2 == 0 { "even" } else { "odd" };
        store
            .add(NewMemory {
                text: format!("m{i}"),
                meta: Some(format!("{{\"tag\": \"{tag}\", \"i\": {i}}}")),
                vector: Some(v.clone()),
            })
            .unwrap();
    }
    let f = Filter::from_json(r#"{"tag": "odd"}"#).unwrap();
    let hits = store.search(Query::Vector(&vs[0]), 100, Precision::F32, Some(&f)).unwrap();
    assert_eq!(hits.len(), 10);
    assert!(hits.iter().all(|h| h.meta.contains("\"odd\"")));
    assert!(Filter::from_json("[1]").is_err());
    assert!(Filter::from_json("{").is_err());
}

#[test]
fn bad_input_is_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::open(dir.path(), opts(4)).unwrap();
    store.add(mem("ok", &[1.0, 0.0, 0.0, 0.0])).unwrap();
    let bad = [
        mem("wrong dim", &[1.0, 2.0]),
        mem("nan", &[f32::NAN, 0.0, 0.0, 0.0]),
        mem("inf", &[f32::INFINITY, 0.0, 0.0, 0.0]),
        mem("zero", &[0.0; 4]),
        mem("   ", &[1.0; 4]),
        mem(&"x".repeat(store::MAX_TEXT_BYTES + 1), &[1.0; 4]),
        NewMemory { text: "no vector".into(), meta: None, vector: None },
        NewMemory { text: "meta".into(), meta: Some("[1,2]".into()), vector: Some(vec![1.0; 4]) },
        NewMemory { text: "meta".into(), meta: Some("{bad".into()), vector: Some(vec![1.0; 4]) },
    ];
    for m in bad {
        let text = m.text.chars().take(20).collect::<String>();
        // A bad memory in a batch rejects the whole batch.
        let r = store.add_many(vec![mem("fine", &[0.0, 1.0, 0.0, 0.0]), m]);
        assert!(matches!(r, Err(Error::Input(_))), "{text}: {r:?}");
    }
    assert_eq!(store.len(), 1);
    let q = [1.0, 0.0, 0.0, 0.0];
    assert!(matches!(store.search(Query::Vector(&q), 0, Precision::F32, None), Err(Error::Input(_))));
    assert!(matches!(store.search(Query::Vector(&q[..3]), 1, Precision::F32, None), Err(Error::Input(_))));
    assert!(matches!(store.search(Query::Vector(&[f32::NAN; 4]), 1, Precision::F32, None), Err(Error::Input(_))));
    assert!(matches!(store.search(Query::Text("hello"), 1, Precision::F32, None), Err(Error::Input(_))));
    assert!(matches!(MemoryStore::open(dir.path(), opts(8)), Err(Error::Input(_))));
}

#[test]
fn one_writer_many_readers() {
    let dir = tempfile::tempdir().unwrap();
    let writer = MemoryStore::open(dir.path(), opts(4)).unwrap();
    assert!(matches!(MemoryStore::open(dir.path(), opts(4)), Err(Error::Input(_))));
    let reader = MemoryStore::open(dir.path(), StoreOptions { read_only: true, ..Default::default() }).unwrap();
    assert!(matches!(reader.add(mem("x", &[1.0; 4])), Err(Error::Input(_))));
    writer.add(mem("x", &[1.0; 4])).unwrap();
    assert_eq!(reader.len(), 0);
    assert!(reader.refresh().unwrap());
    assert_eq!(reader.len(), 1);
    let missing = dir.path().join("nope");
    assert!(MemoryStore::open(&missing, StoreOptions { read_only: true, ..Default::default() }).is_err());
}

#[test]
fn concurrent_searches_see_whole_appends() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(MemoryStore::open(dir.path(), opts(8)).unwrap());
    let vs = vectors(400, 8, 7);
    std::thread::scope(|s| {
        let w = store.clone();
        let batches = vs.clone();
        s.spawn(move || {
            for chunk in batches.chunks(10) {
                fill(&w, chunk);
            }
        });
        for _ in 0..2 {
            let r = store.clone();
            s.spawn(move || {
                for _ in 0..200 {
                    let n = r.search(Query::Vector(&[1.0; 8]), 1000, Precision::F32, None).unwrap().len();
                    assert_eq!(n % 10, 0, "a search saw part of an append ({n} rows)");
                }
            });
        }
    });
    assert_eq!(store.len(), 400);
}

/// Damages the newest segment file in place.
fn newest_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".arrow"))
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

#[test]
fn damaged_files_are_reported_never_silently_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let vs = vectors(10, 4, 9);
    {
        let s = MemoryStore::open(dir.path(), opts(4)).unwrap();
        fill(&s, &vs[..8]);
        fill(&s, &vs[8..]);
    }
    // Interrupted writes (temp files) are ignored and removed.
    fs::write(dir.path().join(".tmp-seg-9999.arrow"), b"partial").unwrap();
    fs::write(dir.path().join(".tmp-MANIFEST-0000000000000099"), b"partial").unwrap();
    drop(MemoryStore::open(dir.path(), opts(4)).unwrap());
    assert!(!dir.path().join(".tmp-seg-9999.arrow").exists());

    // A flipped byte in a segment: clear error naming the file; recover skips it.
    let seg = newest_segment(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    let original = bytes.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&seg, &bytes).unwrap();
    let err = MemoryStore::open(dir.path(), opts(4)).unwrap_err();
    assert!(matches!(err, Error::Format { .. }) && err.to_string().contains("recover"), "{err}");
    let s = MemoryStore::open(dir.path(), StoreOptions { recover: true, ..opts(4) }).unwrap();
    assert_eq!(s.warnings().len(), 1, "{:?}", s.warnings());
    assert_eq!(s.len(), 8);
    drop(s);
    // Truncated segment.
    fs::write(&seg, &original[..original.len() - 7]).unwrap();
    assert!(matches!(MemoryStore::open(dir.path(), opts(4)), Err(Error::Format { .. })));
    fs::write(&seg, &original).unwrap();
    assert_eq!(MemoryStore::open(dir.path(), opts(4)).unwrap().len(), 10);

    // A damaged newest manifest: the previous one is used, with a warning.
    let newest = Manifest::list(dir.path()).unwrap()[0];
    let path = dir.path().join(Manifest::file_name(newest));
    let good = fs::read(&path).unwrap();
    fs::write(&path, &good[..good.len() / 2]).unwrap();
    let s = MemoryStore::open(dir.path(), StoreOptions { read_only: true, ..Default::default() }).unwrap();
    assert!(s.warnings()[0].starts_with("skipped damaged manifest"), "{:?}", s.warnings());
    // The segment only the damaged manifest named is reported, not dropped.
    assert!(s.warnings()[1].contains("in no manifest"), "{:?}", s.warnings());
    assert_eq!(s.len(), 8);
    drop(s);
    // Writing after the fall-back never overwrites the newer files on disk.
    let files_before: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    let s = MemoryStore::open(dir.path(), opts(4)).unwrap();
    s.add(mem("after fall-back", &[1.0; 4])).unwrap();
    drop(s);
    for f in files_before.iter().filter(|f| f.to_string_lossy() != "LOCK") {
        let p = dir.path().join(f);
        if p == path {
            assert_eq!(fs::read(&p).unwrap(), &good[..good.len() / 2], "damaged manifest was overwritten");
        } else {
            assert!(p.exists(), "{f:?} was removed");
        }
    }
    // Restoring the damaged manifest: it is older than the new one now.
    fs::write(&path, &good).unwrap();
    let newest = Manifest::list(dir.path()).unwrap()[0];

    // A store written by a newer format is refused, not misread.
    let mut m: serde_json::Value = serde_json::from_slice(good.split(|&b| b == b'\n').next().unwrap()).unwrap();
    m["format_version"] = 99.into();
    m["version"] = (newest + 1).into();
    let body = m.to_string();
    let newer = format!("{body}\ncrc32 {:08x}\n", crc32fast::hash(body.as_bytes()));
    fs::write(dir.path().join(Manifest::file_name(newest + 1)), newer).unwrap();
    let err = MemoryStore::open(dir.path(), opts(4)).unwrap_err();
    assert!(matches!(err, Error::Config(_)) && err.to_string().contains("newer"), "{err}");
}

fn manifests(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    Manifest::list(dir).unwrap().into_iter().map(|v| dir.join(Manifest::file_name(v))).collect()
}

fn segment_files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("seg-"))
        .collect();
    v.sort();
    v
}

/// Rewrites the newest manifest through `edit` (checksum recomputed).
fn rewrite_newest_manifest(dir: &std::path::Path, edit: impl FnOnce(&mut Manifest)) {
    let path = manifests(dir)[0].clone();
    let mut m = Manifest::decode(&fs::read(&path).unwrap(), "test").unwrap();
    edit(&mut m);
    fs::write(&path, m.encode()).unwrap();
}

#[test]
fn lost_manifests_never_delete_segments_and_recover_rebuilds() {
    let dir = tempfile::tempdir().unwrap();
    let vs = vectors(5, 4, 21);
    {
        let s = MemoryStore::open(dir.path(), opts(4)).unwrap();
        fill(&s, &vs[..3]);
        fill(&s, &vs[3..]);
        s.delete(&[2]).unwrap();
    }
    let segs = segment_files(dir.path());
    for p in manifests(dir.path()) {
        fs::remove_file(p).unwrap();
    }
    // Writable or read-only: a clear error, and every segment stays.
    for read_only in [false, true] {
        let err = MemoryStore::open(dir.path(), StoreOptions { read_only, ..opts(4) }).unwrap_err();
        assert!(matches!(err, Error::Format { .. }) && err.to_string().contains("recover"), "{err}");
        assert_eq!(segment_files(dir.path()), segs);
    }
    // Recovery rebuilds the store from its segments, with a warning.
    let s = MemoryStore::open(dir.path(), StoreOptions { recover: true, ..opts(4) }).unwrap();
    assert!(s.warnings().iter().any(|w| w.contains("recovered")), "{:?}", s.warnings());
    assert_eq!(s.len(), 5, "the deletion was in the lost manifest: the memory comes back, as the warning says");
    assert_eq!(s.get(5).unwrap().text, "memory 1");
    let id = s.add(mem("after recovery", &[1.0, 0.0, 0.0, 0.0])).unwrap();
    assert_eq!(id, 6, "ids are never reused");
    drop(s);
    let s = MemoryStore::open(dir.path(), opts(4)).unwrap();
    assert!(s.warnings().is_empty(), "{:?}", s.warnings());
    assert_eq!(s.len(), 6);
}

#[test]
fn a_deleted_newest_manifest_is_reported_and_recoverable() {
    let dir = tempfile::tempdir().unwrap();
    let vs = vectors(4, 4, 22);
    {
        let s = MemoryStore::open(dir.path(), opts(4)).unwrap();
        fill(&s, &vs[..3]);
        s.add(mem("the last change", &vs[3])).unwrap();
    }
    fs::remove_file(&manifests(dir.path())[0]).unwrap();
    for read_only in [true, false] {
        let s = MemoryStore::open(dir.path(), StoreOptions { read_only, ..opts(4) }).unwrap();
        assert_eq!(s.len(), 3);
        assert!(
            s.warnings().iter().any(|w| w.contains("in no manifest") && w.contains("rolled back")),
            "{:?}",
            s.warnings()
        );
    }
    // Writing on top keeps the orphan (and the warning) until recovery.
    {
        let s = MemoryStore::open(dir.path(), opts(4)).unwrap();
        let id = s.add(mem("written after", &[0.0, 1.0, 0.0, 0.0])).unwrap();
        assert_eq!(id, 5, "the orphan's id 4 is not reused");
    }
    let s = MemoryStore::open(dir.path(), opts(4)).unwrap();
    assert!(s.warnings().iter().any(|w| w.contains("in no manifest")), "{:?}", s.warnings());
    drop(s);
    let s = MemoryStore::open(dir.path(), StoreOptions { recover: true, ..opts(4) }).unwrap();
    assert_eq!(s.len(), 5);
    assert_eq!(s.get(4).unwrap().text, "the last change");
}

#[test]
fn an_interrupted_write_is_rolled_back_silently() {
    let dir = tempfile::tempdir().unwrap();
    let vs = vectors(3, 4, 23);
    {
        let s = MemoryStore::open(dir.path(), opts(4)).unwrap();
        fill(&s, &vs[..2]);
        s.add(mem("unacknowledged", &vs[2])).unwrap();
    }
    // The state a crash leaves between the segment's rename and the
    // manifest's: the manifest is still its temp file.
    let newest = manifests(dir.path())[0].clone();
    let tmp = dir.path().join(format!(".tmp-{}", newest.file_name().unwrap().to_string_lossy()));
    fs::rename(&newest, &tmp).unwrap();
    let s = MemoryStore::open(dir.path(), StoreOptions { read_only: true, ..opts(4) }).unwrap();
    assert!(s.warnings().is_empty(), "{:?}", s.warnings());
    assert_eq!(s.len(), 2);
    drop(s);
    let s = MemoryStore::open(dir.path(), opts(4)).unwrap();
    assert!(s.warnings().is_empty(), "{:?}", s.warnings());
    assert_eq!(s.len(), 2);
    assert!(!tmp.exists());
    assert_eq!(segment_files(dir.path()).len(), 1, "the interrupted write's segment is removed");
}

#[test]
fn a_reader_opened_mid_write_sees_the_publication() {
    let dir = tempfile::tempdir().unwrap();
    let vs = vectors(3, 4, 24);
    let writer = MemoryStore::open(dir.path(), opts(4)).unwrap();
    fill(&writer, &vs[..2]);
    writer.add(mem("third", &vs[2])).unwrap();
    // Reopen the window: segment renamed, manifest not yet.
    let newest = manifests(dir.path())[0].clone();
    let tmp = dir.path().join(format!(".tmp-{}", newest.file_name().unwrap().to_string_lossy()));
    fs::rename(&newest, &tmp).unwrap();
    let reader = MemoryStore::open(dir.path(), StoreOptions { read_only: true, ..opts(4) }).unwrap();
    assert_eq!(reader.len(), 2);
    fs::rename(&tmp, &newest).unwrap(); // the writer's commit
    assert!(reader.refresh().unwrap(), "refresh must see the newly published manifest");
    assert_eq!(reader.len(), 3);
    assert_eq!(reader.get(3).unwrap().text, "third");
}

#[test]
fn manifests_are_not_trusted_blindly() {
    let dir = tempfile::tempdir().unwrap();
    let vs = vectors(3, 4, 25);
    {
        let s = MemoryStore::open(dir.path(), opts(4)).unwrap();
        fill(&s, &vs);
    }
    let pristine: Vec<(std::path::PathBuf, Vec<u8>)> =
        manifests(dir.path()).into_iter().map(|p| (p.clone(), fs::read(&p).unwrap())).collect();
    let restore = || {
        for (p, b) in &pristine {
            fs::write(p, b).unwrap();
        }
    };
    // Segment entries must be plain segment names inside the store.
    for bad in ["/etc/passwd", "../seg-0000000000000001.arrow", "sub/seg-0000000000000001.arrow", "LOCK"] {
        rewrite_newest_manifest(dir.path(), |m| m.segments[0].file = bad.into());
        let s = MemoryStore::open(dir.path(), StoreOptions { read_only: true, ..Default::default() }).unwrap();
        assert!(s.warnings().iter().any(|w| w.contains("not a segment file name")), "{bad}: {:?}", s.warnings());
        restore();
    }
    // next_id behind the ids present: corrected, never reused.
    rewrite_newest_manifest(dir.path(), |m| m.next_id = 1);
    {
        let s = MemoryStore::open(dir.path(), opts(4)).unwrap();
        assert!(s.warnings().iter().any(|w| w.contains("next id")), "{:?}", s.warnings());
        assert_eq!(s.add(mem("new", &[1.0, 2.0, 3.0, 4.0])).unwrap(), 4);
        assert_eq!(s.get(1).unwrap().text, "memory 0");
        assert_eq!(s.len(), 4);
    }
    // Tombstones of unknown ids do not break the count.
    rewrite_newest_manifest(dir.path(), |m| m.deleted = vec![2, 999, 1000, 1001, 1002, 1003]);
    let s = MemoryStore::open(dir.path(), StoreOptions { read_only: true, ..Default::default() }).unwrap();
    assert_eq!(s.len(), 3);
    assert_eq!(s.stats().deleted, 1);
    assert!(s.warnings().iter().any(|w| w.contains("does not hold")), "{:?}", s.warnings());
}

#[test]
fn deleting_lock_does_not_let_a_second_writer_in() {
    let dir = tempfile::tempdir().unwrap();
    let first = MemoryStore::open(dir.path(), opts(4)).unwrap();
    fs::remove_file(dir.path().join("LOCK")).unwrap();
    let err = MemoryStore::open(dir.path(), opts(4)).unwrap_err();
    assert!(err.to_string().contains("open for writing elsewhere"), "{err}");
    first.add(mem("still the writer", &[1.0, 0.0, 0.0, 0.0])).unwrap();
    drop(first);
    // A folder replaced under an open writer is refused, not written.
    let s = MemoryStore::open(dir.path(), opts(4)).unwrap();
    let moved = dir.path().with_extension("moved");
    fs::rename(dir.path(), &moved).unwrap();
    fs::create_dir(dir.path()).unwrap();
    let err = s.add(mem("into the void", &[0.0, 1.0, 0.0, 0.0])).unwrap_err();
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("moved or replaced"), "{err}");
    fs::remove_dir(dir.path()).unwrap();
    fs::rename(&moved, dir.path()).unwrap();
}
