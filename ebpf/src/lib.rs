//! Empty on purpose: the programs are in the `portcullis` binary target
//! (`src/main.rs`). This library target exists so the daemon can name this
//! crate as a build-dependency without cargo warning that it has no lib.
#![no_std]
