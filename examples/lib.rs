//! Runnable examples for leaseholder; see the files in this directory.
