//! The migration stream protocol, pre-copy engine, source-side dedup and cluster orchestration (not built yet: see issues 4 and 5).
