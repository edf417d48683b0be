//! `test/e2e/network/loadbalancer.go`.

use crate::Case;

pub fn cases() -> Vec<Case> {
    Vec::new()
}
