//! `fly-coordinator`: serve a farm, run a suite, or both.

// Reports are allocated on the runtime's threads and freed on the store's writer thread; glibc's
// per-thread arenas fragment badly under that pattern at a million tests (RSS kept growing), and
// mimalloc's small allocations are cheaper too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    fly_coordinator::cli::main()
}
