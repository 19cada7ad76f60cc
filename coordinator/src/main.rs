//! `fly-coordinator`: serve a farm, run a suite, or both.

// Reports are allocated on the runtime's threads and freed on the store's writer thread; glibc's
// per-thread arenas fragment badly under that pattern at a million tests (RSS kept growing), and
// mimalloc's small allocations are cheaper too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    return_freed_memory_at_once();
    fly_coordinator::cli::main()
}

/// mimalloc hands freed pages back to the system only after a delay (10 ms, and ten times that
/// for its arenas), so with reports allocated on one thread and freed on another at 100,000 a
/// second, tens of megabytes of freed pages are resident at any moment. Purging at once costs
/// no measurable throughput (BENCHMARKS.md). An explicit `MIMALLOC_PURGE_DELAY` still wins.
fn return_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options, a plain integer it reads when it purges;
        // `mi_option_purge_delay` is a valid option of the linked mimalloc v2.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
}

/// `mi_option_purge_delay` in mimalloc v2's `mi_option_t` (the -sys crate names only some).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
