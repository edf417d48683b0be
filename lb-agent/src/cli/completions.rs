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

#[cfg(test)]
mod tests {
    #[test]
    fn every_shell_gets_the_subcommands_and_their_flags() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut super::super::command(), "lb-agent", &mut out);
            let text = String::from_utf8(out).expect("UTF-8");
            for word in [
                "manifests",
                "explain",
                "--coexist-with-kube-proxy",
                "--api-server",
            ] {
                assert!(text.contains(word), "{shell}: no {word} in the script");
            }
        }
    }
}
