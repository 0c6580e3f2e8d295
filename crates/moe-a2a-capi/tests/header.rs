//! The checked-in header is the one cbindgen generates from this crate (build.rs).

#[test]
fn the_checked_in_header_is_the_generated_one() {
    let generated = include_str!(concat!(env!("OUT_DIR"), "/moe_a2a.h"));
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../include/moe_a2a.h");
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "include/moe_a2a.h is stale: the C ABI changed. Regenerate it: cp {}/moe_a2a.h include/moe_a2a.h",
        env!("OUT_DIR")
    );
}
