//! leadledger domain: aggregates.
