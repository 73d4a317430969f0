//! Crash-safe file publication: write a temp file, fsync it, rename it over
//! the target, fsync the directory. After a crash a reader sees either the old
//! state or the new one, never a torn file; temp files are recognisable by
//! their prefix and are removed on the next writable open.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Prefix of every temp file: anything starting with it is garbage.
pub const TEMP_PREFIX: &str = ".tmp-";

pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    write_temp(dir, name, bytes)?;
    commit_temp(dir, name)?;
    sync_dir(dir).map_err(|e| Error::io(dir, e))
}

/// The temp name under which `name` is written before it is committed.
pub fn temp_name(name: &str) -> String {
    format!("{TEMP_PREFIX}{name}")
}

/// Writes and fsyncs `bytes` as the temp file of `name` (not yet visible
/// under `name`); removed again if anything fails.
pub fn write_temp(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(temp_name(name));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(dir.join(name), e)
    })
}

/// Renames the temp file of `name` to `name` (the caller fsyncs the folder).
pub fn commit_temp(dir: &Path, name: &str) -> Result<()> {
    let tmp = dir.join(temp_name(name));
    fs::rename(&tmp, dir.join(name)).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(dir.join(name), e)
    })
}

/// fsync a directory so that a rename or unlink in it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
