//! `fly-coordinator`: serve a farm, run a suite, or both.

fn main() -> std::process::ExitCode {
    fly_coordinator::cli::main()
}
