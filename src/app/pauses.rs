//! Points on a command's way through its group where a test can hold it, so that a race
//! the tests must cover (a command joining a group whose leader guessed, say) happens every
//! time instead of now and then. Built only with the `test-hooks` feature, which the
//! crate's own tests turn on; a build without it has none of this.
//!
//! A test calls [`hold`] for a point and a stream before the command gets there. The
//! first command to reach that point of that stream stops there and says so
//! ([`Held::reached`]) until the test lets it go on ([`Held::release`]); the hold is then
//! used up, and later commands pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Semaphore;

/// Where a command can be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Point {
    /// A group's leader has taken its own turn and its group still takes members: held
    /// here, the group stays open for any command of the stream that comes meanwhile.
    LeaderTurnTaken,
    /// A member of a group has taken its turn (decided, or been refused) and has not yet
    /// told its leader: held here, its leader cannot close the group.
    MemberTurnTaken,
    /// A command whose group rolled back (or lost to another writer) is about to try
    /// again, in a new group.
    TryingAgain,
    /// A group's write is about to be sent, alone or in a batch with other groups of its
    /// aggregate type. Held here, a group without a transaction holds the task that runs
    /// its type's write batches, and the writes that come meanwhile queue for the next
    /// batch (see `command::queued_writes`).
    Writing,
}

/// A hold a test has set: how it learns that a command got there, and lets it go on.
pub struct Held {
    reached: Semaphore,
    released: Semaphore,
}

impl Held {
    /// Waits until a command has reached the point.
    pub async fn reached(&self) {
        self.reached
            .acquire()
            .await
            .expect("the semaphore is never closed")
            .forget();
    }

    /// Lets the held command go on (or the next to come pass at once).
    pub fn release(&self) {
        self.released.add_permits(1);
    }
}

type Key = (Point, &'static str, String);

fn holds() -> &'static Mutex<HashMap<Key, Arc<Held>>> {
    static HOLDS: OnceLock<Mutex<HashMap<Key, Arc<Held>>>> = OnceLock::new();
    HOLDS.get_or_init(Mutex::default)
}

/// Holds the next command of the stream `aggregate_type`/`id` that reaches `point`.
pub fn hold(point: Point, aggregate_type: &'static str, id: &str) -> Arc<Held> {
    let held = Arc::new(Held {
        reached: Semaphore::new(0),
        released: Semaphore::new(0),
    });
    crate::lock(holds()).insert((point, aggregate_type, id.to_string()), held.clone());
    held
}

/// Called by the command at `point`: stops there if a test holds it.
pub(crate) async fn reach(point: Point, aggregate_type: &'static str, id: &str) {
    let held = crate::lock(holds()).remove(&(point, aggregate_type, id.to_string()));
    if let Some(held) = held {
        held.reached.add_permits(1);
        held.released
            .acquire()
            .await
            .expect("the semaphore is never closed")
            .forget();
    }
}
