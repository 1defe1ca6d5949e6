//! The guest binaries as cargo builds them carry the revision mark the host reads from an
//! image (with the mark dropped by the linker, a host would take its own binaries for
//! revision 1 and never give an older image the agent it needs).

#[test]
fn each_guest_binary_carries_this_revision() {
    for bin in [
        env!("CARGO_BIN_EXE_banger-init"),
        env!("CARGO_BIN_EXE_banger-agent"),
    ] {
        let bytes = std::fs::read(bin).unwrap();
        assert_eq!(
            banger_guest::revision_of(&bytes),
            banger_guest::GUEST_REVISION,
            "{bin}"
        );
    }
}
