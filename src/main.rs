//! The `leadledger` binary: everything lives in the library; see `leadledger::cli`.

fn main() -> anyhow::Result<()> {
    leadledger::cli::main()
}
