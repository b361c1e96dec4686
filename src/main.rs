//! The `blacktree` binary; see `blacktree --help`.

fn main() -> std::process::ExitCode {
    blacktree::cli::main()
}
