//! Thread pools that bound each object's threads (`threads=` on Engine,
//! MemoryStore, Embedder).
//!
//! Two kinds:
//! - [`thread_pool`]: a rayon pool, for work made of few large tasks
//!   (embedding batches, searching a store).
//! - [`Pool`]: a fork-join team whose workers spin between jobs, for the
//!   diffusion forward pass. A 64-token forward pass of the tiny model is
//!   about 30 parallel loops of 20-100 us each. Rayon parks idle workers
//!   after a few microseconds, and waking one on this VM takes about as long
//!   as the loop itself: measured, a 64x256x768 product ran no faster on 2
//!   threads than on 1. Workers that spin for a while after each job (as
//!   OpenMP's do under PyTorch) pick the next loop up at once.
//!
//! [`parallel_for`] runs on the [`Pool`] installed on the calling thread, or
//! on the current rayon pool when there is none, so kernels shared by both
//! worlds (`quant::packed`) need no flag. Every caller splits work into tasks
//! by shape only, never by thread count, so results never depend on either.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::{input_err, Error, Result};

/// How long an idle worker spins before it parks. Longer than the gaps
/// between the parallel loops of a generation (sampler, Python), short
/// enough not to burn a core for long after the last call.
const SPIN: Duration = Duration::from_millis(2);

fn thread_count(threads: Option<usize>) -> Result<usize> {
    match threads {
        Some(0) => input_err!("threads must be >= 1"),
        Some(n) if n > 1024 => input_err!("threads = {n} is absurd"),
        Some(n) => Ok(n),
        None => Ok(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
    }
}

/// A rayon pool of `threads` workers (default: every core), named `aios-<what>-<i>`.
pub fn thread_pool(threads: Option<usize>, what: &'static str) -> Result<rayon::ThreadPool> {
    let threads = thread_count(threads)?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("aios-{what}-{i}"))
        .build()
        .map_err(|e| Error::Input(format!("could not start {threads} threads: {e}")))
}

thread_local! {
    /// The team installed on this thread by [`Pool::install`].
    static CURRENT: Cell<*const Shared> = const { Cell::new(ptr::null()) };
    /// Set while running a task: nested loops then run serially.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `task(i)` for every `i` in `0..n`, on the calling thread plus the
/// installed [`Pool`]'s workers (or the current rayon pool without one).
/// Returns when all are done. A panicking task makes this panic too, after
/// the others finished.
pub fn parallel_for(n: usize, task: impl Fn(usize) + Sync) {
    if n <= 1 || IN_TASK.get() {
        return (0..n).for_each(task);
    }
    let team = CURRENT.get();
    if team.is_null() {
        return (0..n).into_par_iter().for_each(&task);
    }
    // SAFETY: `install` keeps the pool (and so `Shared`) alive while it is set.
    unsafe { &*team }.run(n, &task);
}

/// [`parallel_for`] over groups of `group` consecutive tasks: for tasks of a
/// microsecond or two, claiming each one separately made the threads contend
/// for the task counter (int8 products ran no faster on 2 threads than on 1).
/// Groups too large leave one thread idle at the end instead, so callers size
/// them by work.
pub fn parallel_for_grouped(n: usize, group: usize, task: impl Fn(usize) + Sync) {
    let group = group.max(1);
    parallel_for(n.div_ceil(group), |g| (g * group..((g + 1) * group).min(n)).for_each(&task));
}

/// Runs `f(first_row, a_rows, b_rows)` in parallel over blocks of
/// `rows_per_task` rows of two row-major buffers with the same number of
/// rows (`a` rows are `a_width` wide, `b` rows `b_width`). For row-wise
/// passes (norms, residual adds) that write two buffers at once.
pub fn parallel_row_blocks<A: Send, B: Send>(
    (a, a_width): (&mut [A], usize),
    (b, b_width): (&mut [B], usize),
    rows_per_task: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let rows = a.len().checked_div(a_width).unwrap_or(0);
    assert!(a.len() == rows * a_width && b.len() == rows * b_width, "parallel_row_blocks: buffers disagree on rows");
    let rows_per_task = rows_per_task.max(1);
    let (pa, pb) = (RawSlice(a.as_mut_ptr()), RawSlice(b.as_mut_ptr()));
    let (pa, pb) = (&pa, &pb);
    parallel_for(rows.div_ceil(rows_per_task), |t| {
        let (start, end) = (t * rows_per_task, ((t + 1) * rows_per_task).min(rows));
        // SAFETY: task t alone touches rows [start, end) of each buffer, and
        // both buffers have `rows` rows (asserted above).
        let (ra, rb) = unsafe {
            (
                std::slice::from_raw_parts_mut(pa.0.add(start * a_width), (end - start) * a_width),
                std::slice::from_raw_parts_mut(pb.0.add(start * b_width), (end - start) * b_width),
            )
        };
        f(start, ra, rb);
    });
}

/// [`parallel_row_blocks`] over one buffer.
pub fn parallel_rows<A: Send>(a: &mut [A], width: usize, rows_per_task: usize, f: impl Fn(usize, &mut [A]) + Sync) {
    parallel_row_blocks((a, width), (&mut [] as &mut [u8], 0), rows_per_task, |r, a, _| f(r, a));
}

/// A buffer's base pointer, shared by tasks that write disjoint parts.
struct RawSlice<T>(*mut T);
// SAFETY: only used by `parallel_row_blocks`, whose tasks write disjoint rows.
unsafe impl<T: Send> Sync for RawSlice<T> {}

/// `(0..n).map(f)` computed with [`parallel_for`], in order.
pub fn parallel_map<T: Send + Sync>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let slots: Vec<OnceLock<T>> = (0..n).map(|_| OnceLock::new()).collect();
    parallel_for(n, |i| {
        let _ = slots[i].set(f(i));
    });
    slots.into_iter().map(|s| s.into_inner().expect("parallel_map: every task ran")).collect()
}

/// A fork-join team of `threads` threads: the caller of [`Pool::install`]
/// plus `threads - 1` spinning workers named `aios-<what>-<i>`.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

/// One [`parallel_for`] call, on the caller's stack.
struct Job<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    n: usize,
    /// The next task to claim. On its own cache line: every claim writes it.
    next: CacheLine<AtomicUsize>,
    remaining: AtomicUsize,
    panicked: AtomicBool,
}

#[repr(align(64))]
struct CacheLine<T>(T);

struct Shared {
    threads: usize,
    /// The job being run, or null. Lifetime erased: [`Shared::run`] does
    /// not return before every worker has let go of it (`refs`).
    job: AtomicPtr<Job<'static>>,
    /// Bumped for every job (and at shutdown); workers wait for a change.
    epoch: AtomicU64,
    /// Workers currently holding the job pointer.
    refs: AtomicUsize,
    stop: AtomicBool,
    /// One job at a time: a second caller (another Python thread on the
    /// same engine) runs its loop serially instead of waiting.
    busy: Mutex<()>,
    sleepers: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

impl Pool {
    /// A team of `threads` (default: every core).
    pub fn new(threads: Option<usize>, what: &'static str) -> Result<Self> {
        let threads = thread_count(threads)?;
        let shared = Arc::new(Shared {
            threads,
            job: AtomicPtr::new(ptr::null_mut()),
            epoch: AtomicU64::new(0),
            refs: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            busy: Mutex::new(()),
            sleepers: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut pool = Pool { shared, workers: vec![] };
        for i in 1..threads {
            let shared = Arc::clone(&pool.shared);
            let worker = std::thread::Builder::new()
                .name(format!("aios-{what}-{i}"))
                .spawn(move || shared.worker())
                .map_err(|e| Error::Input(format!("could not start {threads} threads: {e}")))?;
            pool.workers.push(worker);
        }
        Ok(pool)
    }

    pub fn threads(&self) -> usize {
        self.shared.threads
    }

    /// Runs `f` on the calling thread with this team serving its
    /// [`parallel_for`] loops.
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(*const Shared);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.set(self.0);
            }
        }
        let _restore = Restore(CURRENT.replace(Arc::as_ptr(&self.shared)));
        f()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        self.shared.epoch.fetch_add(1, SeqCst);
        drop(self.shared.park.lock().unwrap_or_else(|e| e.into_inner()));
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} threads)", self.shared.threads)
    }
}

impl Shared {
    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        let Ok(_busy) = self.busy.try_lock() else {
            return (0..n).for_each(task);
        };
        let job = Job {
            task,
            n,
            next: CacheLine(AtomicUsize::new(0)),
            remaining: AtomicUsize::new(n),
            panicked: AtomicBool::new(false),
        };
        self.job.store(&job as *const Job as *mut Job<'static>, SeqCst);
        self.epoch.fetch_add(1, SeqCst);
        if self.sleepers.load(SeqCst) > 0 {
            drop(self.park.lock().unwrap_or_else(|e| e.into_inner()));
            self.wake.notify_all();
        }
        job.work();
        while job.remaining.load(SeqCst) > 0 {
            std::hint::spin_loop();
        }
        self.job.store(ptr::null_mut(), SeqCst);
        while self.refs.load(SeqCst) > 0 {
            std::hint::spin_loop();
        }
        // Unlock before panicking, so the mutex is not poisoned.
        drop(_busy);
        if job.panicked.load(SeqCst) {
            panic!("a parallel task panicked");
        }
    }

    fn worker(&self) {
        IN_TASK.set(true);
        // Not the current epoch: a job (or shutdown) may already have been
        // published before this thread started, and it must not be missed.
        let mut seen = 0;
        loop {
            let epoch = self.wait_for_change(seen);
            if self.stop.load(SeqCst) {
                return;
            }
            seen = epoch;
            self.refs.fetch_add(1, SeqCst);
            let job = self.job.load(SeqCst);
            // The job may already be finished and replaced: only a job
            // published under the epoch we saw is ours to help with.
            if !job.is_null() && self.epoch.load(SeqCst) == epoch {
                // SAFETY: `run` keeps the job alive until `refs` drops to 0.
                unsafe { &*job }.work();
            }
            self.refs.fetch_sub(1, SeqCst);
        }
    }

    /// Spins until `epoch` differs from `seen`, parking after [`SPIN`].
    fn wait_for_change(&self, seen: u64) -> u64 {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = self.epoch.load(SeqCst);
            if epoch != seen {
                return epoch;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                let mut guard = self.park.lock().unwrap_or_else(|e| e.into_inner());
                self.sleepers.fetch_add(1, SeqCst);
                while self.epoch.load(SeqCst) == seen && !self.stop.load(SeqCst) {
                    guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                self.sleepers.fetch_sub(1, SeqCst);
                return self.epoch.load(SeqCst);
            }
            std::hint::spin_loop();
        }
    }
}

impl Job<'_> {
    fn work(&self) {
        let was = IN_TASK.replace(true);
        let mut done = 0;
        loop {
            let i = self.next.0.fetch_add(1, SeqCst);
            if i >= self.n {
                break;
            }
            if catch_unwind(AssertUnwindSafe(|| (self.task)(i))).is_err() {
                self.panicked.store(true, SeqCst);
            }
            done += 1;
        }
        // Once per thread rather than per task: fewer writes to a shared line.
        self.remaining.fetch_sub(done, SeqCst);
        IN_TASK.set(was);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_on_any_team_size() {
        for threads in [1, 2, 3] {
            let pool = Pool::new(Some(threads), "test").unwrap();
            for n in [0usize, 1, 2, 7, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.install(|| {
                    parallel_for(n, |i| {
                        hits[i].fetch_add(1, SeqCst);
                    })
                });
                assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "threads {threads}, n {n}");
            }
            for group in [1, 3, 64] {
                let hits: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
                pool.install(|| {
                    parallel_for_grouped(100, group, |i| {
                        hits[i].fetch_add(1, SeqCst);
                    })
                });
                assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "threads {threads}, group {group}");
            }
            let squares = pool.install(|| parallel_map(100, |i| i * i));
            assert_eq!(squares, (0..100).map(|i| i * i).collect::<Vec<_>>());
        }
    }

    #[test]
    fn workers_share_the_work_and_nested_loops_run_serially() {
        let pool = Pool::new(Some(2), "test").unwrap();
        let names = Mutex::new(std::collections::BTreeSet::new());
        pool.install(|| {
            parallel_for(64, |_| {
                names.lock().unwrap().insert(std::thread::current().name().map(str::to_owned));
                // A nested loop inside a task must not deadlock on the busy team.
                parallel_for(3, |_| std::thread::sleep(Duration::from_micros(200)));
            })
        });
        assert_eq!(names.lock().unwrap().len(), 2, "both threads should have run tasks");
    }

    #[test]
    fn concurrent_callers_and_parked_workers() {
        let pool = Pool::new(Some(2), "test").unwrap();
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..50 {
                        pool.install(|| {
                            parallel_for(10, |_| {
                                total.fetch_add(1, SeqCst);
                            })
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(SeqCst), 3 * 50 * 10);
        // After the spin window the worker parks; a new job must wake it.
        std::thread::sleep(SPIN * 3);
        assert_eq!(tasks_run(&pool, 100), 100);
    }

    #[test]
    fn a_panicking_task_is_reported_and_the_pool_survives() {
        let pool = Pool::new(Some(2), "test").unwrap();
        let r =
            catch_unwind(AssertUnwindSafe(|| pool.install(|| parallel_for(10, |i| assert!(i != 5, "task 5 fails")))));
        assert!(r.is_err());
        assert_eq!(tasks_run(&pool, 10), 10);
    }

    /// How many of `n` tasks ran when a parallel loop of `n` runs on `pool`.
    fn tasks_run(pool: &Pool, n: usize) -> usize {
        let count = AtomicUsize::new(0);
        pool.install(|| {
            parallel_for(n, |_| {
                count.fetch_add(1, SeqCst);
            })
        });
        count.load(SeqCst)
    }

    #[test]
    fn row_blocks_cover_every_row_once() {
        let pool = Pool::new(Some(3), "test").unwrap();
        for rows in [0usize, 1, 7, 8, 9, 64] {
            let (mut a, mut b) = (vec![0u32; rows * 3], vec![0u32; rows]);
            pool.install(|| {
                parallel_row_blocks((&mut a, 3), (&mut b, 1), 8, |first, ra, rb| {
                    for (i, (r, v)) in ra.chunks_exact_mut(3).zip(rb.iter_mut()).enumerate() {
                        r.iter_mut().for_each(|x| *x += (first + i) as u32 + 1);
                        *v += 1;
                    }
                })
            });
            assert!(a.chunks_exact(3).enumerate().all(|(i, r)| r.iter().all(|&x| x == i as u32 + 1)), "{rows}");
            assert!(b.iter().all(|&v| v == 1), "{rows}");
        }
    }

    #[test]
    fn thread_counts_are_checked() {
        assert!(Pool::new(Some(0), "test").is_err());
        assert!(Pool::new(Some(100_000), "test").is_err());
        assert_eq!(Pool::new(Some(3), "test").unwrap().threads(), 3);
    }
}
