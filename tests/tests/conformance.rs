//! The conformance suite, once per built-in backend.

moe_a2a_tests::conformance_suite!(nvlink_one_sided, "nvlink-one-sided");
moe_a2a_tests::conformance_suite!(nvlink_two_sided, "nvlink-two-sided");
moe_a2a_tests::conformance_suite!(allgather_rs, "allgather-rs");
