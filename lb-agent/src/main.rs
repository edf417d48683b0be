//! `lb-agent`: the node daemon (`run`) and the operator CLI over the pinned maps. The command line lives in the
//! library (`lb_agent::cli`) so the integration tests run exactly this agent.

fn main() -> std::process::ExitCode {
    lb_agent::cli::main()
}
