//! The read-only status page (`GET /`): one HTML page that fetches `/status` every
//! second and draws the pair, its links, the copy's progress and recent alerts.

/// The page.
pub const PAGE: &str = include_str!("page.html");
