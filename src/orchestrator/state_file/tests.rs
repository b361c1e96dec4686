use super::*;

/// A fresh directory of its own under the temp directory.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "blacktree-state-{name}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn worker(id: &str, port: u16) -> Remembered {
    Remembered {
        id: id.into(),
        address: format!("10.0.0.1:{port}"),
        region: "eu".into(),
        labels: crate::labels::Labels::new([("arch".into(), "arm64".into())]).unwrap(),
        capacity: 2,
        is_static: false,
    }
}

#[test]
fn what_is_saved_is_read_back_sorted_and_a_missing_file_remembers_nothing() {
    let path = temp_dir("roundtrip").join("sub/registry.json");
    let (file, remembered) = StateFile::open(&path, false).unwrap();
    assert_eq!(remembered, Remembrance::default());
    file.save(|| vec![worker("b", 2), worker("a", 1)]).unwrap();
    drop(file);
    let (_file, remembered) = StateFile::open(&path, false).unwrap();
    assert_eq!(remembered.workers, vec![worker("a", 1), worker("b", 2)]);
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    assert!(!Path::new(&temp).exists(), "no temp file is left behind");
}

#[test]
fn an_unchanged_registry_is_not_written_again() {
    let path = temp_dir("unchanged").join("registry.json");
    let (file, _) = StateFile::open(&path, false).unwrap();
    file.save(|| vec![worker("a", 1)]).unwrap();
    fs::remove_file(&path).unwrap();
    file.save(|| vec![worker("a", 1)]).unwrap();
    assert!(!path.exists(), "the same contents were written twice");
    file.save(|| vec![worker("a", 3)]).unwrap();
    assert!(path.exists());
}

#[test]
fn a_corrupt_file_named_by_the_flag_stops_the_start_with_its_name() {
    let path = temp_dir("corrupt").join("registry.json");
    fs::write(&path, b"{\"version\":1,\"workers\":[{\"id\":").unwrap();
    let Err(e) = StateFile::open(&path, false) else {
        panic!("a corrupt file was accepted");
    };
    assert!(
        e.contains(&path.display().to_string()) && e.contains("corrupt"),
        "{e}"
    );
    assert!(path.exists(), "the corrupt file is left for the operator");
}

#[test]
fn a_corrupt_default_file_is_moved_aside_and_the_registry_starts_empty() {
    let path = temp_dir("lenient").join("registry.json");
    fs::write(&path, b"not json").unwrap();
    let (_file, remembered) = StateFile::open(&path, true).unwrap();
    assert!(remembered.workers.is_empty());
    let aside = fs::read(path.with_extension("json.corrupt")).unwrap();
    assert_eq!(aside, b"not json");
}

#[test]
fn a_file_of_another_version_is_refused() {
    let path = temp_dir("version").join("registry.json");
    fs::write(&path, br#"{"version":2,"workers":[]}"#).unwrap();
    let Err(e) = StateFile::open(&path, false) else {
        panic!("version 2 was read");
    };
    assert!(e.contains("version 2"), "{e}");
}

#[test]
fn two_orchestrators_cannot_share_a_state_file() {
    let path = temp_dir("shared").join("registry.json");
    let (_first, _) = StateFile::open(&path, false).unwrap();
    let Err(e) = StateFile::open(&path, false) else {
        panic!("the second orchestrator opened a held state file");
    };
    assert!(e.contains("in use by another orchestrator"), "{e}");
}

#[test]
fn an_empty_flag_turns_remembering_off() {
    assert!(open(Some(Path::new(""))).unwrap().is_none());
}

#[test]
fn early_cancels_are_kept_beside_the_workers_until_they_expire() {
    let path = temp_dir("cancels").join("registry.json");
    let (file, _) = StateFile::open(&path, false).unwrap();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    file.save(|| vec![worker("a", 1)]).unwrap();
    let kept = EarlyCancel::new("kept".into(), now + hour);
    let expired = EarlyCancel::new("expired".into(), now - hour);
    file.save_cancels(vec![kept.clone(), expired]).unwrap();
    // Saving the workers again keeps the cancels, and the other way round.
    file.save(|| vec![worker("a", 1), worker("b", 2)]).unwrap();
    drop(file);
    let (file, remembered) = StateFile::open(&path, false).unwrap();
    assert_eq!(remembered.workers, vec![worker("a", 1), worker("b", 2)]);
    assert_eq!(
        remembered.cancels,
        vec![kept],
        "the expired cancel is dropped"
    );
    file.save_cancels(Vec::new()).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains("cancels"),
        "a file without early cancels is one older orchestrators read: {text}"
    );
}
