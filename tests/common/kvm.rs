//! Availability checks for KVM and root-only facilities, strict under
//! FTVM_REQUIRE_KVM=1.
#![allow(dead_code)]

/// Whether /dev/kvm can be used. With FTVM_REQUIRE_KVM=1 a missing KVM fails the test;
/// otherwise the test prints why it skips.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("FTVM_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: FTVM_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}");
            }
            eprintln!("{test}: SKIPPED: /dev/kvm cannot be opened: {e}");
            false
        }
    }
}

/// Whether the test may require root-only facilities (namespaces); strict under
/// FTVM_REQUIRE_KVM=1 like KVM itself.
pub fn root_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if std::env::var("FTVM_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: FTVM_REQUIRE_KVM=1 but the test does not run as root");
        }
        eprintln!("{test}: SKIPPED: needs root for a mount namespace");
    }
    root
}
