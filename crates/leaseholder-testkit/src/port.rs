//! Free loopback ports.

use std::net::{Ipv4Addr, TcpListener};

use crate::Error;

/// Returns a TCP port on `127.0.0.1` that was free a moment ago.
///
/// The port is found by binding `127.0.0.1:0` and closing the listener
/// again, so another process may grab it before the caller binds it. That
/// race is rare enough for tests; a server that fails to bind can simply be
/// started again on a fresh port.
pub fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| Error::io("binding 127.0.0.1:0", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("reading the address of a listener on 127.0.0.1:0", e))?;
    Ok(addr.port())
}
