//! `test/e2e/network/endpointslice.go`.

use crate::Case;

pub fn cases() -> Vec<Case> {
    Vec::new()
}
