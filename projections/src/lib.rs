//! leadledger read side.
