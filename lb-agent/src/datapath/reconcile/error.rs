//! Why one frontend could not be programmed. A failure stays with its frontend: the sync goes on with the others
//! and the next one retries it.

use super::super::map_error::MapsError;
use crate::maglev::MaglevError;
use crate::state::Backend;

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// Every backend id is taken (`--max-backends`).
    #[error("backend capacity ({capacity}) reached: cannot add {backend}")]
    BackendCapacity { capacity: u32, backend: Backend },
    /// Every service id is taken (`--max-services`).
    #[error("service capacity ({capacity}) reached")]
    ServiceCapacity { capacity: u32 },
    /// The Maglev table could not be built from the frontend's backends.
    #[error("{0}")]
    Table(#[from] MaglevError),
    /// The kernel refused a write.
    #[error("{0}")]
    Map(#[from] MapsError),
}

impl FrontendError {
    /// Whether a map or id space is full: the operator's remedy is a larger capacity, not a retry.
    pub fn is_capacity(&self) -> bool {
        matches!(
            self,
            FrontendError::BackendCapacity { .. } | FrontendError::ServiceCapacity { .. }
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
