//! `test/e2e/network/localhost.go`.

use crate::Case;

pub fn cases() -> Vec<Case> {
    Vec::new()
}
