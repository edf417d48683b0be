//! The node daemon, `lb-agent run`: start-up (`startup`: load, attach, adopt the pinned state), the loop over the
//! source's changes (`run_loop`), and one sync from objects to maps (`syncer`). The CLI only turns flags into an
//! [`AgentConfig`]; everything the daemon does is here or below it (`source`, `model`, `datapath`, `ops`).

mod config;
mod run_loop;
mod startup;
mod syncer;

pub use config::{AgentConfig, SourceConfig};

use anyhow::Context;

/// Runs the agent until SIGTERM or SIGINT (the datapath stays in place after it).
pub fn run(config: AgentConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run_loop::run(config))
}
