//! The agent exactly as built from this tree (the same `lb_agent::cli::main` as the `lb-agent` binary), so the
//! integration tests find it through `CARGO_BIN_EXE_lb-agent-under-test` and never run a stale build.

fn main() -> std::process::ExitCode {
    lb_agent::cli::main()
}
