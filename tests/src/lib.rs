//! shrink's cross-crate integration tests live in `tests/tests/`: Shrinker across hosts
//! (`shrinker.rs`) and vnetd's two sites (`vnet_two_sites.rs`). The tests of the
//! testbed and of the quick evaluation are the tools crate's own (`tools/tests/`). They use the
//! test utilities of `shrink-testutil` and the testbeds of `shrink-tools`, and run the
//! workspace's binaries of the cargo profile they are built with (`target/<profile>/`, or
//! `$SHRINK_BIN_DIR`; `make test` builds them first).
