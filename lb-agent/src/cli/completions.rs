//! `lb-agent completions bash|zsh|fish`: the shell completion script, from the same command definition the binary
//! parses with (so it never lists a flag that does not exist).

#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh or fish (also elvish, powershell).
    shell: clap_complete::Shell,
}

pub fn run(args: &CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = super::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(args.shell, &mut cmd, "lb-agent", &mut out);
    Ok(())
}
