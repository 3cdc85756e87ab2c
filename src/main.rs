//! The `portal-sync` binary: everything lives in the library, see `portal_sync::cli`.

fn main() -> std::process::ExitCode {
    portal_sync::cli::main()
}
