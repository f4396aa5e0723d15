//! The `leadledger` binary: everything lives in the library; see `leadledger::cli`.

fn main() -> std::process::ExitCode {
    leadledger::cli::main()
}
