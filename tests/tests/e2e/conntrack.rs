//! `test/e2e/network/conntrack.go`.

use crate::Case;

pub fn cases() -> Vec<Case> {
    Vec::new()
}
