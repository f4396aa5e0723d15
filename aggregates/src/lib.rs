//! leadledger's domain: one aggregate per module, each with its state, commands, events
//! (past tense), typed errors and given/when/then tests. No I/O, no clock: commands carry
//! the time they happen at, so that handling and replay are deterministic.

pub mod budget;
pub mod campaign;
pub mod contact;
pub mod enrollment;
pub mod money;
pub mod text;
pub mod upcasters;

pub use budget::{
    Budget, BudgetCommand, BudgetError, BudgetEvent, BudgetName, BudgetPeriod, GracePercent,
    Reservation, ReservationOutcome, SpendCategory,
};
pub use campaign::{
    Campaign, CampaignCommand, CampaignError, CampaignEvent, CampaignName, CampaignStatus,
};
pub use contact::{
    Contact, ContactCommand, ContactEmail, ContactError, ContactEvent, ContactFields,
    ContactFieldsInput, Enrichment, QualityScore, contact_id_for,
};
pub use enrollment::{
    Enrollment, EnrollmentCommand, EnrollmentError, EnrollmentEvent, EnrollmentStatus, Milestones,
    ProviderEventKind, enrollment_id_for,
};
pub use money::{Limit, Money, MoneyError, PositiveAmount};
