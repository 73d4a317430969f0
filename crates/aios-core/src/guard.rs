//! Hostile files can make a dependency's decoder panic (the parquet and
//! arrow-ipc readers index by lengths read from the file). Such a panic is
//! caught and turned into a format error by the caller; [`catch_silent`]
//! also keeps the default panic hook from printing "thread '...' panicked at"
//! for it, so neither the CLI nor Python shows panic text for a bad file.
//! Panics anywhere else still print as before (the hook chains to the
//! previous one).

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

thread_local! {
    /// Depth of `catch_silent` calls on this thread.
    static SILENT: Cell<u32> = const { Cell::new(0) };
}
static HOOK: Once = Once::new();
static SILENCED: AtomicU64 = AtomicU64::new(0);

fn install_hook() {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if SILENT.with(|s| s.get()) == 0 {
                previous(info);
            } else {
                SILENCED.fetch_add(1, Ordering::Relaxed);
            }
        }));
    });
}

/// How many panics `catch_silent` has caught in this process (the fuzzer
/// reports it, to show the decoders' panics are exercised).
pub fn silenced() -> u64 {
    SILENCED.load(Ordering::Relaxed)
}

/// Runs `f`; a panic inside it (on this thread) returns None and prints
/// nothing. Use only around decoding of untrusted bytes, where a panic means
/// "corrupt input", never around code whose panics are bugs to see.
pub fn catch_silent<T>(f: impl FnOnce() -> T) -> Option<T> {
    install_hook();
    SILENT.with(|s| s.set(s.get() + 1));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    SILENT.with(|s| s.set(s.get() - 1));
    result.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_panic_is_none_and_the_value_passes_through() {
        assert_eq!(catch_silent(|| 7), Some(7));
        assert_eq!(catch_silent(|| -> i32 { panic!("decoder bug") }), None);
        // Nesting restores the depth.
        assert_eq!(catch_silent(|| catch_silent(|| -> i32 { panic!("inner") })), Some(None));
        assert_eq!(SILENT.with(|s| s.get()), 0);
    }
}
