//! Why one frontend could not be programmed. A failure stays with its frontend: the sync goes on with the others
//! and the next one retries it. A full map names the map, the flag that sizes it and what the cluster needs, so the
//! operator knows what to raise; the frontends that fit are programmed, the others are reported, never dropped
//! silently.

use super::super::map_error::MapsError;
use crate::maglev::MaglevError;
use crate::state::Backend;

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// Every backend id is taken.
    #[error(
        "LB_BACKENDS is full: --max-backends {capacity} holds {capacity} backends{}; cannot add {backend}",
        needed_note(*needed)
    )]
    BackendCapacity {
        capacity: u32,
        /// Distinct backends the desired state names, when known.
        needed: Option<usize>,
        backend: Backend,
    },
    /// Every service id is taken.
    #[error(
        "LB_SERVICES is full: --max-services {capacity} holds {capacity} frontends{}",
        needed_note(*needed)
    )]
    ServiceCapacity {
        capacity: u32,
        /// Frontends the desired state holds, when known.
        needed: Option<usize>,
    },
    /// The slot array cannot grow to hold the table.
    #[error(
        "LB_MAGLEV's slot array cannot grow to {needed_mib} MiB (limit {limit_mib} MiB): lower --maglev-max-size \
         or the number of Services"
    )]
    TableCapacity { needed_mib: u64, limit_mib: u64 },
    /// The Maglev table could not be built from the frontend's backends.
    #[error("{0}")]
    Table(#[from] MaglevError),
    /// The kernel refused a write.
    #[error("{0}")]
    Map(#[from] MapsError),
}

fn needed_note(needed: Option<usize>) -> String {
    match needed {
        Some(n) => format!(", the cluster needs {n}"),
        None => String::new(),
    }
}

impl FrontendError {
    /// Whether a map is full: the operator's remedy is a larger capacity, not a retry.
    pub fn is_capacity(&self) -> bool {
        matches!(
            self,
            FrontendError::BackendCapacity { .. }
                | FrontendError::ServiceCapacity { .. }
                | FrontendError::TableCapacity { .. }
        )
    }
}

/// Two failures are the same when they are of one kind and say the same (a kernel error carries no equality of its
/// own); what the property tests compare two reconcilers' reports by.
impl PartialEq for FrontendError {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

/// The same failure again (the reconciler reports one cause for many frontends, e.g. a failed table write).
impl FrontendError {
    pub(super) fn again(&self) -> FrontendError {
        match self {
            FrontendError::BackendCapacity {
                capacity,
                needed,
                backend,
            } => FrontendError::BackendCapacity {
                capacity: *capacity,
                needed: *needed,
                backend: *backend,
            },
            FrontendError::ServiceCapacity { capacity, needed } => FrontendError::ServiceCapacity {
                capacity: *capacity,
                needed: *needed,
            },
            FrontendError::TableCapacity {
                needed_mib,
                limit_mib,
            } => FrontendError::TableCapacity {
                needed_mib: *needed_mib,
                limit_mib: *limit_mib,
            },
            FrontendError::Table(e) => FrontendError::Table(e.clone()),
            FrontendError::Map(e) => FrontendError::Map(MapsError::Again(e.to_string())),
        }
    }
}
