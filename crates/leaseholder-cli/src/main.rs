//! `leaseholder`: the operator CLI of the leaseholder crate. Shows, watches
//! and force-releases the leader-election leases of a store (NATS
//! JetStream KV, PostgreSQL, Redis, etcd, SQLite), and creates or checks
//! the store's bucket or table.
//!
//! ```text
//! leaseholder --store nats://127.0.0.1:4222?bucket=leases list
//! leaseholder --store postgres://app@db/app?table=ops.leases show scheduler
//! leaseholder --store redis://cache:6379?prefix=billing watch
//! leaseholder --store etcd://10.0.0.1:2379/billing release scheduler --force
//! leaseholder --store sqlite:///var/lib/app/leases.db setup --dry-run
//! ```
//!
//! Exit codes: 0 success, 1 other failure, 2 usage, 3 store unreachable,
//! 4 bucket or table missing or misconfigured, 5 a foreign value (not a
//! leaseholder lease), 6 unsupported by this store, 7 permission denied,
//! 8 a forced release not confirmed.

#![forbid(unsafe_code)]

mod args;
mod commands;
mod error;
mod render;
mod store;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = args::Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("leaseholder: error: cannot start the runtime: {e}");
            return ExitCode::from(error::code::OTHER);
        }
    };
    let result = runtime.block_on(commands::run(args));
    // Observers and the store's background tasks end with the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leaseholder: error: {}", e.one_line());
            e.exit_code()
        }
    }
}
