//! Upcasters: how stored events of older versions are read as the current version.
//! Both the event store (loading aggregates) and the feed (projections) apply them, so an
//! event is read the same way wherever it is read.

use cqrs_es::persist::EventUpcaster;

/// Every upcaster of every aggregate. An event type changes by adding one here (with a new
/// `event_version`), never by renaming or reshaping a stored field in place.
pub fn all() -> Vec<Box<dyn EventUpcaster>> {
    Vec::new()
}
