//! The `leadledger` binary: everything lives in the library; see `leadledger::cli`.

// mimalloc rather than the system allocator: reading and decoding events frees many small
// JSON values, and glibc's allocator spent about a quarter of a rebuild's CPU on that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    leadledger::cli::main()
}
