//! leadledger's domain: one aggregate per module, each with its state, commands, events
//! (past tense), typed errors and given/when/then tests. No I/O, no clock: commands carry
//! the time they happen at, so that handling and replay are deterministic.

pub mod campaign;
pub mod upcasters;

pub use campaign::{
    Campaign, CampaignCommand, CampaignError, CampaignEvent, CampaignName, CampaignStatus,
};
